/* Interrupt-driven 16550A I/O: COM1's IRQ 4 routed through the IOAPIC to
 * a handler (vmm/guests/irq.h), which drains the receive FIFO and refills
 * the transmitter on THRE interrupts.
 *
 * Sends "irq ready\n" by THRE interrupts, collects received bytes (RDA /
 * character-timeout interrupts) up to a '.', sends "got" and their hex
 * digits by THRE interrupts, then "irqs ok\n" by polling and powers off.
 * test_exit(n) names a failed check.
 */
#include "guest.h"
#include "irq.h"
#include "serial.h"

IRQ_RING3_INTERRUPTS_ON;

#define VECTOR 0x34
#define B COM1_BASE
#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)
#define SPINS 4000000000ull

static volatile uint8_t rx_buf[256];
static volatile uint32_t rx_head, rx_irqs, thre_irqs, other_irqs;
static const char *volatile tx_ptr;
static volatile uint32_t tx_left;

/* Ring 0, interrupts off: serve every pending source (IIR) once or twice. */
static void uart_isr(unsigned vector)
{
    (void)vector;
    for (int round = 0; round < 8; round++) {
        uint8_t iir = inb(B + UART_IIR);
        if (iir & UART_IIR_NO_INT)
            return;
        switch (iir & UART_IIR_ID) {
        case UART_IIR_RDI:
        case UART_IIR_RX_TIMEOUT:
            rx_irqs++;
            while (inb(B + UART_LSR) & UART_LSR_DR)
                rx_buf[rx_head++ & 255] = inb(B + UART_RX);
            break;
        case UART_IIR_THRI:
            thre_irqs++;
            for (int n = 0; n < 16 && tx_left; n++, tx_left--)
                outb(B + UART_TX, (uint8_t)*tx_ptr++);
            if (!tx_left)
                outb(B + UART_IER, UART_IER_RDI);      /* nothing more to send */
            break;
        default:
            other_irqs++;
            inb(B + UART_LSR);
            inb(B + UART_MSR);
        }
    }
}

static void send_by_interrupts(const char *s, uint32_t n)
{
    tx_ptr = s;
    tx_left = n;
    outb(B + UART_IER, UART_IER_RDI | UART_IER_THRI);  /* THR empty: interrupts at once */
    for (uint64_t i = 0; tx_left; i++) {
        CHECK(2, i < SPINS);
        cpu_relax();
    }
}

int guest_main(void)
{
    static const char hex[] = "0123456789abcdef";
    static char line[256 * 3 + 8];

    CHECK(1, serial_init(B) == 0);
    irq_init();
    irq_set_handler(VECTOR, uart_isr);
    ioapic_route(COM1_IRQ, VECTOR, lapic_id());
    outb(B + UART_MCR, UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2);   /* OUT2 gates IRQ 4 */
    outb(B + UART_IER, UART_IER_RDI);
    irq_enable();

    send_by_interrupts("irq ready\n", 10);
    CHECK(3, thre_irqs >= 1);

    uint32_t got = 0, n = 0;
    memcpy(line, "got", 3);
    n = 3;
    for (;;) {
        for (uint64_t i = 0; got == rx_head; i++) {
            CHECK(4, i < SPINS);
            cpu_relax();
        }
        uint8_t c = rx_buf[got++ & 255];
        if (c == '.' || n > sizeof line - 8)
            break;
        line[n++] = ' ';
        line[n++] = hex[c >> 4];
        line[n++] = hex[c & 15];
    }
    line[n++] = '\n';
    send_by_interrupts(line, n);
    CHECK(5, rx_irqs >= 1);
    irq_disable();
    outb(B + UART_IER, 0);
    serial_printf("irqs ok\n");
    return 0;
}
