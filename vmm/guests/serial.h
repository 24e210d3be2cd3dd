/* A polling driver for the 16550A UART at COM1 (devices/serial.py), for
 * the project's test and demo guests; ring 3, port I/O only.  Register
 * names as in Linux's include/uapi/linux/serial_reg.h.  Build a guest with
 * vmm/guests/serial.c among its sources. */
#ifndef SPLITVMM_SERIAL_H
#define SPLITVMM_SERIAL_H

#include <stddef.h>
#include <stdint.h>

#define COM1_BASE 0x3f8
#define COM1_IRQ 4

#define UART_RX 0           /* DLAB 0, in */
#define UART_TX 0           /* DLAB 0, out */
#define UART_DLL 0          /* DLAB 1 */
#define UART_DLM 1          /* DLAB 1 */
#define UART_IER 1
#define UART_IIR 2          /* in */
#define UART_FCR 2          /* out */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_SCR 7

#define UART_IER_RDI 0x01
#define UART_IER_THRI 0x02
#define UART_IER_RLSI 0x04
#define UART_IER_MSI 0x08

#define UART_IIR_NO_INT 0x01
#define UART_IIR_ID 0x0e
#define UART_IIR_MSI 0x00
#define UART_IIR_THRI 0x02
#define UART_IIR_RDI 0x04
#define UART_IIR_RLSI 0x06
#define UART_IIR_RX_TIMEOUT 0x0c
#define UART_IIR_FIFO_ENABLED 0xc0

#define UART_FCR_ENABLE_FIFO 0x01
#define UART_FCR_CLEAR_RCVR 0x02
#define UART_FCR_CLEAR_XMIT 0x04
#define UART_FCR_TRIGGER_1 0x00
#define UART_FCR_TRIGGER_4 0x40
#define UART_FCR_TRIGGER_8 0x80
#define UART_FCR_TRIGGER_14 0xc0

#define UART_LCR_DLAB 0x80
#define UART_LCR_WLEN8 0x03

#define UART_MCR_DTR 0x01
#define UART_MCR_RTS 0x02
#define UART_MCR_OUT1 0x04
#define UART_MCR_OUT2 0x08
#define UART_MCR_LOOP 0x10

#define UART_LSR_DR 0x01
#define UART_LSR_OE 0x02
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40

#define UART_MSR_DCTS 0x01
#define UART_MSR_DDSR 0x02
#define UART_MSR_TERI 0x04
#define UART_MSR_DDCD 0x08
#define UART_MSR_CTS 0x10
#define UART_MSR_DSR 0x20
#define UART_MSR_RI 0x40
#define UART_MSR_DCD 0x80

#define UART_CLOCK_BAUD 115200

/* The UART the functions below drive (COM1_BASE unless changed). */
extern uint16_t serial_base;

/* Program the UART at `base`: 115200 baud 8N1, FIFOs on (trigger 1,
 * both cleared), DTR and RTS on, interrupts off.  Returns 0, or -1 when
 * nothing answers there (the scratch register does not hold a value). */
int serial_init(uint16_t base);
void serial_putc(char c);
void serial_write(const void *buf, size_t n);
void serial_puts(const char *s);
/* printf for %s %c %d %u %x %lx %lu %ld %p %%, with an optional width,
 * 0 flag (e.g. %08x) and # flag on x (%#x: 0x prefix). */
void serial_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The next received byte, or -1 when none came within `polls` reads of
 * LSR (0: wait forever). */
int serial_getc(uint64_t polls);

#endif
