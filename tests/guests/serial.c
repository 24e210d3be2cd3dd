/* Exercises the 16550A UART at COM1 (devices/serial.py) from ring 3.
 *
 * Command line "mode=":
 *   out     prints "BEGIN\n", every byte value 0..255, a printf line and
 *           "END\n", then powers off;
 *   echo    prints "ready\n", then answers each received byte with its
 *           two hex digits and a space ("61 "), until it receives '.'
 *           ("bye\n", power off);
 *   regs    register-level checks (divisor latch, scratch, LSR, IIR
 *           priorities, loopback, MSR); prints "regs ok\n" and powers off,
 *           or ends with test_exit(n), n naming the failed check;
 *   absent  checks that nothing answers at COM1 (all ones), powers off.
 * The interrupt output stays off (MCR OUT2 clear while IER is set).
 */
#include "guest.h"
#include "serial.h"

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

static uint8_t rd(unsigned reg) { return inb((uint16_t)(COM1_BASE + reg)); }
static void wr(unsigned reg, uint8_t v) { outb((uint16_t)(COM1_BASE + reg), v); }

static int mode_is(const char *want)
{
    const char *p = guest_cmdline();
    for (; *p; p++) {
        const char *k = "mode=", *q = p;
        while (*k && *q == *k) k++, q++;
        if (*k)
            continue;
        const char *w = want;
        while (*w && *q == *w) w++, q++;
        return !*w && (*q == 0 || *q == ' ');
    }
    return 0;
}

static int out(void)
{
    char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (char)i;
    serial_puts("BEGIN\n");
    serial_write(all, sizeof all);
    serial_printf("printf: %d %u %x %s %c %08x %lx %#x %%\n", -42, 42u, 0xbeefu, "str", 'c', 0x1234u,
                  0x123456789abcul, 0x3f8u);
    serial_puts("END\n");
    return 0;
}

static int echo(void)
{
    serial_puts("ready\n");
    for (;;) {
        int c = serial_getc(0);
        if (c == '.') {
            serial_puts("bye\n");
            return 0;
        }
        serial_printf("%02x ", (unsigned)c);
    }
}

static int regs(void)
{
    CHECK(1, serial_init(COM1_BASE) == 0);
    /* SCR holds what is written. */
    wr(UART_SCR, 0xa5);
    CHECK(2, rd(UART_SCR) == 0xa5);
    wr(UART_SCR, 0x3c);
    CHECK(3, rd(UART_SCR) == 0x3c);
    /* DLAB: offsets 0 and 1 are the divisor latch, apart from RBR/IER. */
    wr(UART_LCR, UART_LCR_DLAB | UART_LCR_WLEN8);
    wr(UART_DLL, 0x34);
    wr(UART_DLM, 0x12);
    CHECK(4, rd(UART_DLL) == 0x34 && rd(UART_DLM) == 0x12);
    CHECK(5, rd(UART_LCR) == 0x83);
    wr(UART_LCR, UART_LCR_WLEN8);
    CHECK(6, rd(UART_IER) == 0);
    wr(UART_IER, 0xff);                 /* only bits 3:0 exist */
    CHECK(7, rd(UART_IER) == 0x0f);
    wr(UART_IER, 0);
    wr(UART_LCR, UART_LCR_DLAB | UART_LCR_WLEN8);
    CHECK(8, rd(UART_DLL) == 0x34 && rd(UART_DLM) == 0x12);
    wr(UART_LCR, UART_LCR_WLEN8);
    /* At rest: transmitter empty, nothing received, nothing pending. */
    CHECK(10, rd(UART_LSR) == (UART_LSR_THRE | UART_LSR_TEMT));
    CHECK(11, rd(UART_IIR) == 0xc1);
    CHECK(12, rd(UART_MSR) == (UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS));

    /* Loopback: what is sent is received, not put on the line. */
    wr(UART_MCR, UART_MCR_LOOP);
    wr(UART_TX, 0xa5);
    CHECK(20, rd(UART_LSR) & UART_LSR_DR);
    CHECK(21, rd(UART_RX) == 0xa5);
    CHECK(22, !(rd(UART_LSR) & UART_LSR_DR));
    /* MSR follows MCR: CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2, with deltas. */
    CHECK(23, rd(UART_MSR) == (UART_MSR_DCTS | UART_MSR_DDSR | UART_MSR_DDCD));
    CHECK(24, rd(UART_MSR) == 0);
    wr(UART_MCR, UART_MCR_LOOP | UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT1 | UART_MCR_OUT2);
    CHECK(25, rd(UART_MSR) == 0xfb);
    CHECK(26, rd(UART_MSR) == 0xf0);
    wr(UART_MCR, UART_MCR_LOOP | UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2);
    CHECK(27, rd(UART_MSR) == (UART_MSR_CTS | UART_MSR_DSR | UART_MSR_DCD | UART_MSR_TERI));
    wr(UART_MCR, UART_MCR_LOOP);        /* OUT2 off: the interrupt output stays quiet */
    rd(UART_MSR);

    /* IIR priorities: RLS > RDA / timeout > THRE > modem status. */
    wr(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT | UART_FCR_TRIGGER_1);
    wr(UART_IER, UART_IER_THRI);        /* enabling THRI with THR empty interrupts */
    CHECK(30, rd(UART_IIR) == 0xc2);
    CHECK(31, rd(UART_IIR) == 0xc1);    /* reading IIR cleared it */
    wr(UART_IER, UART_IER_RDI | UART_IER_THRI | UART_IER_RLSI | UART_IER_MSI);
    CHECK(32, rd(UART_IIR) == 0xc1);
    wr(UART_TX, 0x11);
    CHECK(33, rd(UART_IIR) == 0xc4);    /* data (and THRE) pending: data first */
    CHECK(34, rd(UART_RX) == 0x11);
    CHECK(35, rd(UART_IIR) == 0xc2);
    CHECK(36, rd(UART_IIR) == 0xc1);
    wr(UART_MCR, UART_MCR_LOOP | UART_MCR_RTS);
    CHECK(37, rd(UART_IIR) == 0xc0);    /* modem status: delta CTS */
    CHECK(38, rd(UART_MSR) == (UART_MSR_CTS | UART_MSR_DCTS));
    CHECK(39, rd(UART_IIR) == 0xc1);
    /* 17 bytes into the 16-byte FIFO: an overrun, the highest priority. */
    for (unsigned i = 0; i < 17; i++)
        wr(UART_TX, (uint8_t)i);
    CHECK(40, rd(UART_IIR) == 0xc6);
    CHECK(41, rd(UART_LSR) == (UART_LSR_OE | UART_LSR_DR | UART_LSR_THRE | UART_LSR_TEMT));
    CHECK(42, rd(UART_LSR) == (UART_LSR_DR | UART_LSR_THRE | UART_LSR_TEMT));
    CHECK(43, rd(UART_IIR) == 0xc4);
    for (unsigned i = 0; i < 16; i++)
        CHECK(44, rd(UART_RX) == i);    /* the 17th byte was lost */
    CHECK(45, !(rd(UART_LSR) & UART_LSR_DR));
    CHECK(46, rd(UART_IIR) == 0xc2);
    CHECK(47, rd(UART_IIR) == 0xc1);
    /* Below the trigger level (14) with the line idle: character timeout. */
    wr(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_TRIGGER_14);
    wr(UART_TX, 1);
    wr(UART_TX, 2);
    wr(UART_TX, 3);
    CHECK(50, rd(UART_IIR) == 0xcc);
    CHECK(51, rd(UART_RX) == 1 && rd(UART_RX) == 2 && rd(UART_RX) == 3);
    CHECK(52, rd(UART_IIR) == 0xc2);
    /* FIFOs off (16450 mode): IIR bits 7:6 clear, one-byte RBR overwritten. */
    wr(UART_FCR, 0);
    CHECK(60, (rd(UART_IIR) & 0xc0) == 0);
    wr(UART_TX, 0x41);
    wr(UART_TX, 0x42);
    CHECK(61, rd(UART_IIR) == UART_IIR_RLSI);
    CHECK(62, rd(UART_LSR) & UART_LSR_OE);
    CHECK(63, rd(UART_RX) == 0x42);
    CHECK(64, rd(UART_IIR) == UART_IIR_THRI);
    /* Back to normal. */
    wr(UART_IER, 0);
    CHECK(70, serial_init(COM1_BASE) == 0);
    CHECK(71, rd(UART_IIR) == 0xc1);
    serial_puts("regs ok\n");
    return 0;
}

static int absent(void)
{
    CHECK(80, rd(UART_LSR) == 0xff);
    CHECK(81, serial_init(COM1_BASE) == -1);
    return 0;
}

int guest_main(void)
{
    if (mode_is("out"))
        return out();
    if (mode_is("echo"))
        return echo();
    if (mode_is("regs"))
        return regs();
    if (mode_is("absent"))
        return absent();
    return 99;
}
