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
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <seccomp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

uint32_t sb_act_errno(int err) { return SCMP_ACT_ERRNO(err); }

int sb_pivot_root(const char *new_root, const char *put_old)
{
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

/* Whether unshare(CLONE_NEWUSER) would succeed here, asked in a child that
 * shares this process's memory and is waited for at once (CLONE_VM |
 * CLONE_VFORK): no copy of the address space, no Python in the child, which
 * only makes the call and exits with its errno.  Returns 0 (it would
 * succeed), the errno it would fail with, or -errno when the child cannot
 * be made or waited for.  The calling process must have one thread. */
static char sb_probe_stack[16384] __attribute__((aligned(16)));

static int sb_probe_child(void *arg)
{
    (void)arg;
    _exit(unshare(CLONE_NEWUSER) == 0 ? 0 : (errno > 0 && errno < 256 ? errno : 255));
    return 0;
}

int sb_probe_userns(void)
{
    int status;
    pid_t pid = clone(sb_probe_child, sb_probe_stack + sizeof sb_probe_stack,
                      CLONE_VM | CLONE_VFORK | SIGCHLD, NULL);
    if (pid < 0)
        return -errno;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -ECHILD;
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

/* A call outside the allowlist (seccomp=kill and trap).  The filter's
 * default action is SECCOMP_RET_TRAP: the kernel skips the call and sends
 * SIGSYS to the thread that made it (siginfo carries the number).  The
 * handler
 *   - with seccomp=trap, writes "seccomp: blocked system call NAME (NR)"
 *     to verbose_fd and hands over to the handler that was there before it
 *     (faulthandler's, which dumps every thread's Python stack: the line
 *     that made the call is on top of the current thread);
 *   - sends the VMM one protocol frame on the control socket, an Error
 *     message "killed by seccomp: NAME" (ipc/protocol.py: a 4-byte length,
 *     then the msgpack map {"type": "error", "message": ...}; a
 *     SOCK_SEQPACKET packet of its own, so it cannot interleave with a
 *     frame another thread is sending);
 *   - calls exit_group(sentinel), which a second filter turns into
 *     SECCOMP_RET_KILL_PROCESS: the process dies of SIGSYS.
 * No allocation here (the call may have been made inside malloc): names
 * come from a table filled before the filter was loaded.  The process
 * cannot take SIGSYS away from this handler (rt_sigaction on SIGSYS is
 * outside its allowlist in kill mode). */
#define SB_MAX_SYSCALL 512
#define SB_NAME_LEN 32
static char names[SB_MAX_SYSCALL][SB_NAME_LEN];
static int report_sock = -1, verbose_fd = -1;
static long sentinel;
static struct sigaction previous;

void sb_set_syscall_name(int nr, const char *name)
{
    if (nr >= 0 && nr < SB_MAX_SYSCALL) {
        strncpy(names[nr], name, SB_NAME_LEN - 1);
        names[nr][SB_NAME_LEN - 1] = 0;
    }
}

static size_t put(char *out, size_t at, const char *s)
{
    size_t n = strlen(s);
    memcpy(out + at, s, n);
    return at + n;
}

static void on_sigsys(int sig, siginfo_t *info, void *ctx)
{
    char num[16], *p = num + sizeof num;
    int nr = info->si_syscall;
    *--p = 0;
    do { *--p = (char)('0' + nr % 10); nr /= 10; } while (nr && p > num);
    const char *name = info->si_syscall >= 0 && info->si_syscall < SB_MAX_SYSCALL
        && names[info->si_syscall][0] ? names[info->si_syscall] : p;
    if (verbose_fd >= 0) {
        char line[128];
        size_t n = put(line, 0, "seccomp: blocked system call ");
        n = put(line, n, name);
        n = put(line, n, " (");
        n = put(line, n, p);
        n = put(line, n, ")\n");
        ssize_t r = write(verbose_fd, line, n);
        (void)r;
        if (previous.sa_flags & SA_SIGINFO) {
            if (previous.sa_sigaction)
                previous.sa_sigaction(sig, info, ctx);
        } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
            previous.sa_handler(sig);
        }
    }
    if (report_sock >= 0) {
        char frame[160], text[64];
        size_t tn = put(text, 0, "killed by seccomp: ");
        tn = put(text, tn, name);
        size_t n = 4;
        frame[n++] = (char)0x82;                        /* map of 2 */
        frame[n++] = (char)0xa4; n = put(frame, n, "type");
        frame[n++] = (char)0xa5; n = put(frame, n, "error");
        frame[n++] = (char)0xa7; n = put(frame, n, "message");
        frame[n++] = (char)0xd9; frame[n++] = (char)tn;  /* str 8 */
        memcpy(frame + n, text, tn);
        n += tn;
        uint32_t len = (uint32_t)(n - 4);
        memcpy(frame, &len, 4);                         /* little-endian length (x86-64) */
        ssize_t r = send(report_sock, frame, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)r;
    }
    syscall(SYS_exit_group, sentinel);                  /* killed here by the sentinel filter */
    _exit(128 + SIGSYS);
}

int sb_install_sigsys(int sock, int vfd, long sentinel_value)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    report_sock = sock;
    verbose_fd = vfd;
    sentinel = sentinel_value;
    return sigaction(SIGSYS, &sa, &previous);
}

int sb_load_bpf(const void *prog, size_t len, unsigned int flags)
{
    struct sock_fprog fprog;

    if (len == 0 || len % sizeof(struct sock_filter) != 0 || len / sizeof(struct sock_filter) > BPF_MAXINSNS) {
        errno = EINVAL;
        return -1;
    }
    fprog.len = (unsigned short)(len / sizeof(struct sock_filter));
    fprog.filter = (struct sock_filter *)prog;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &fprog);
}
