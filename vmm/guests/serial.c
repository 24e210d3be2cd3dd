/* The polling 16550A driver of serial.h. */
#include <stdarg.h>

#include "guest.h"
#include "serial.h"

/* Bounded wait for THRE before a write goes out anyway. */
#define THRE_POLLS 1000000u
#define TX_FIFO 16

uint16_t serial_base = COM1_BASE;

static inline uint8_t uart_in(unsigned reg) { return inb((uint16_t)(serial_base + reg)); }
static inline void uart_out(unsigned reg, uint8_t v) { outb((uint16_t)(serial_base + reg), v); }

int serial_init(uint16_t base)
{
    serial_base = base;
    uart_out(UART_SCR, 0x5a);
    if (uart_in(UART_SCR) != 0x5a)
        return -1;
    uart_out(UART_IER, 0);
    uart_out(UART_LCR, UART_LCR_DLAB);
    uart_out(UART_DLL, 1);                      /* 115200 / 1 */
    uart_out(UART_DLM, 0);
    uart_out(UART_LCR, UART_LCR_WLEN8);         /* 8N1, DLAB off */
    uart_out(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT);
    uart_out(UART_MCR, UART_MCR_DTR | UART_MCR_RTS);
    return 0;
}

/* Room in the transmitter: a whole FIFO once THRE is seen. */
static unsigned tx_room;

static void wait_thre(void)
{
    for (unsigned i = 0; i < THRE_POLLS; i++)
        if (uart_in(UART_LSR) & UART_LSR_THRE)
            break;
    tx_room = TX_FIFO;
}

void serial_putc(char c)
{
    if (!tx_room)
        wait_thre();
    tx_room--;
    uart_out(UART_TX, (uint8_t)c);
}

void serial_write(const void *buf, size_t n)
{
    const char *p = buf;
    while (n--)
        serial_putc(*p++);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

static void put_number(uint64_t v, unsigned base, int negative, int width, char pad)
{
    char tmp[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (negative)
        tmp[n++] = '-';
    for (int i = n; i < width; i++)
        serial_putc(pad);
    while (n)
        serial_putc(tmp[--n]);
}

void serial_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        char pad = ' ';
        int width = 0, lng = 0;
        fmt++;
        if (*fmt == '#') {
            fmt++;
            if (*fmt == 'x' || (fmt[0] == 'l' && fmt[1] == 'x'))
                serial_puts("0x");
        }
        if (*fmt == '0')
            pad = '0', fmt++;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l')
            lng = 1, fmt++;
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            serial_puts(s ? s : "(null)");
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            put_number(v < 0 ? (uint64_t)-v : (uint64_t)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            put_number(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0, width, pad);
            break;
        case 'x':
            put_number(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 0, width, pad);
            break;
        case 'p':
            serial_puts("0x");
            put_number((uint64_t)(uintptr_t)va_arg(ap, void *), 16, 0, width, pad);
            break;
        case '%':
            serial_putc('%');
            break;
        case 0:
            fmt--;
            break;
        default:
            serial_putc('%');
            serial_putc(*fmt);
        }
    }
    va_end(ap);
}

int serial_getc(uint64_t polls)
{
    for (uint64_t i = 0; polls == 0 || i < polls; i++)
        if (uart_in(UART_LSR) & UART_LSR_DR)
            return uart_in(UART_RX);
    return -1;
}
