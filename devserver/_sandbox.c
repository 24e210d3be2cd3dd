/* The device-process sandbox's C part; see _sandbox.h. */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <grp.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <seccomp.h>

uint32_t sb_act_errno(int err) { return SCMP_ACT_ERRNO(err); }

int sb_pivot_root(const char *new_root, const char *put_old)
{
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

/* Effective, permitted and inheritable sets all empty (capset(2)). */
int sb_capset_zero(void)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    return (int)syscall(SYS_capset, &hdr, data);
}

int sb_landlock_abi(void)
{
    return (int)syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
}

/* Bits newer than the installed <linux/landlock.h> (Debian 12 has ABI 2);
 * the values are the kernel's stable uapi. */
#define SB_FS_TRUNCATE (1ULL << 14)
#define SB_FS_IOCTL_DEV (1ULL << 15)
#define SB_NET_BIND_TCP (1ULL << 0)
#define SB_NET_CONNECT_TCP (1ULL << 1)
#define SB_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0)
#define SB_SCOPE_SIGNAL (1ULL << 1)

struct sb_ruleset_attr { uint64_t handled_access_fs, handled_access_net, scoped; };

/* A ruleset that handles every filesystem right this ABI knows (and TCP
 * bind/connect from ABI 4; abstract Unix sockets and signals scoped to
 * the domain from ABI 6) with no rule allowing any of them, enforced on the calling
 * thread (landlock_restrict_self(2): threads started later inherit it). */
int sb_landlock_deny_all(int abi)
{
    struct sb_ruleset_attr attr;
    memset(&attr, 0, sizeof attr);
    size_t size = sizeof(uint64_t);                  /* ABI 1-3: handled_access_fs */
    attr.handled_access_fs = LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE
        | LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR | LANDLOCK_ACCESS_FS_REMOVE_DIR
        | LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_CHAR | LANDLOCK_ACCESS_FS_MAKE_DIR
        | LANDLOCK_ACCESS_FS_MAKE_REG | LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO
        | LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM;
    if (abi >= 2)
        attr.handled_access_fs |= LANDLOCK_ACCESS_FS_REFER;
    if (abi >= 3)
        attr.handled_access_fs |= SB_FS_TRUNCATE;
    if (abi >= 4) {
        attr.handled_access_net = SB_NET_BIND_TCP | SB_NET_CONNECT_TCP;
        size = 2 * sizeof(uint64_t);
    }
    if (abi >= 5)
        attr.handled_access_fs |= SB_FS_IOCTL_DEV;
    if (abi >= 6) {
        attr.scoped = SB_SCOPE_ABSTRACT_UNIX_SOCKET | SB_SCOPE_SIGNAL;
        size = 3 * sizeof(uint64_t);
    }
    int fd = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (fd < 0)
        return -1;
    int rc = (int)syscall(SYS_landlock_restrict_self, fd, 0);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* seccomp=trap.  The kernel sends SIGSYS to the thread that made a call
 * outside the allowlist (SECCOMP_RET_TRAP; siginfo carries the number).
 * The handler writes "seccomp: blocked <name> (<nr>)", then hands over to
 * the handler that was there before it (faulthandler's, which dumps every
 * thread's Python stack: the line that made the call is on top of the
 * current thread), then dies of SIGSYS with the default action. */
static int report_fd = 2;
static struct sigaction previous;

static void put(const char *s) { ssize_t r = write(report_fd, s, strlen(s)); (void)r; }

static void on_sigsys(int sig, siginfo_t *info, void *ctx)
{
    char num[24], *p = num + sizeof num;
    int nr = info->si_syscall;
    *--p = 0;
    do { *--p = (char)('0' + nr % 10); nr /= 10; } while (nr && p > num);
    /* Not async-signal-safe (it allocates), but this process is about to die. */
    char *name = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, info->si_syscall);
    put("seccomp: blocked system call ");
    put(name ? name : "?");
    put(" (");
    put(p);
    put(")\n");
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction)
            previous.sa_sigaction(sig, info, ctx);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    }
    signal(SIGSYS, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGSYS);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGSYS);
    _exit(128 + SIGSYS);
}

int sb_install_sigsys(int fd)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    report_fd = fd;
    return sigaction(SIGSYS, &sa, &previous);
}
