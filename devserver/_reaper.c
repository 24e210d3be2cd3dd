/* The device sandbox's two reapers as a small static program
 * (devserver/sandbox/namespaces.py): the forked interpreter execs it, so a
 * reaper holds ~100 KiB of its own instead of a copy of the device's
 * interpreter (~4.5 MB each, two per device).
 *
 *   _reaper outer PID PIDFD STATUS_FD PARENT FORWARD
 *       The process the VMM started.  Waits for PID (pid 1 of the device's
 *       pid namespace, PIDFD its pidfd), then leaves the way the device left:
 *       the wait status pid 1 wrote on STATUS_FD, or pid 1's own when it
 *       wrote none (it was killed).  When its parent is no longer PARENT
 *       (looked at every PARENT_CHECK_MS, and at once), it kills pid 1 --
 *       and so the namespace -- and leaves with 0.  FORWARD 1: SIGTERM is
 *       passed on to pid 1.
 *   _reaper inner DEVICE STATUS_FD FORWARD
 *       pid 1 of the namespace.  Reaps whatever ends there until DEVICE
 *       has, writes DEVICE's wait status (4 bytes, native order) on
 *       STATUS_FD, leaves.  FORWARD 1: SIGTERM is passed on to DEVICE.
 *
 * Static, so that it runs whatever the namespace's root is by then (the
 * device pivots to an empty one at any moment); exec'd through a
 * descriptor opened before the sandbox began.  Before it reads anything it
 * makes itself not dumpable, drops every capability it might hold and
 * loads its own allowlist (libseccomp, killed on anything else); the
 * parent-death signal, no_new_privs, rlimits and the closed descriptors
 * come through the exec from the interpreter's lock-down. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/capability.h>
#include <seccomp.h>

#define PARENT_CHECK_MS 500

static int forward_to = -1;     /* outer: pid 1's pidfd; inner: the device's pid */
static int outer;

static void fail(const char *what)
{
    static const char head[] = "device sandbox reaper: ";
    ssize_t r = write(2, head, sizeof head - 1);
    r = write(2, what, strlen(what));
    r = write(2, "\n", 1);
    (void)r;
    _exit(1);
}

static long number(const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end)
        fail("bad argument");
    return v;
}

static void on_sigterm(int sig)
{
    int saved = errno;
    if (outer)
        syscall(SYS_pidfd_send_signal, forward_to, SIGTERM, NULL, 0);
    else
        kill(forward_to, SIGTERM);
    errno = saved;
    (void)sig;
}

/* Not dumpable (the exec made it so again), no capabilities, and only the
 * calls below. */
static void lock_down(int pidfd, int device, int forward)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3];
    memset(caps, 0, sizeof caps);
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) || syscall(SYS_capset, &hdr, caps))
        fail("cannot drop dumpability or capabilities");
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
    if (!ctx)
        fail("seccomp_init");
    static const int plain[] = {
        SCMP_SYS(read), SCMP_SYS(write), SCMP_SYS(poll), SCMP_SYS(ppoll), SCMP_SYS(wait4),
        SCMP_SYS(waitid), SCMP_SYS(getpid), SCMP_SYS(getppid), SCMP_SYS(rt_sigaction),
        SCMP_SYS(rt_sigprocmask), SCMP_SYS(rt_sigreturn), SCMP_SYS(restart_syscall),
        SCMP_SYS(exit), SCMP_SYS(exit_group),
    };
    int rc = 0;
    for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++)
        rc |= seccomp_rule_add(ctx, SCMP_ACT_ALLOW, plain[i], 0);
    /* signals: to itself (leaving by the device's signal), to pid 1 (outer), the device (inner) */
    rc |= seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(kill), 1, SCMP_A0(SCMP_CMP_EQ, getpid()));
    if (pidfd >= 0)
        rc |= seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(pidfd_send_signal), 1,
                               SCMP_A0(SCMP_CMP_EQ, (uint64_t)pidfd));
    if (device > 0 && forward)
        rc |= seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(kill), 2, SCMP_A0(SCMP_CMP_EQ, (uint64_t)device),
                               SCMP_A1(SCMP_CMP_EQ, SIGTERM));
    if (rc || seccomp_load(ctx))
        fail("cannot load the seccomp filter");
    /* ctx is not released: free() may give memory back (brk, munmap), which the filter now kills */
}

/* The interpreter blocked SIGTERM before the exec when it is to be
 * forwarded (a SIGTERM in between stays pending): handle, then unblock. */
static void forward_sigterm(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigterm;
    sigemptyset(&sa.sa_mask);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    if (sigaction(SIGTERM, &sa, NULL) || sigprocmask(SIG_UNBLOCK, &set, NULL))
        fail("cannot handle SIGTERM");
}

static void die_of(int sig)
{
    if (sig != SIGKILL && sig != SIGSTOP)
        signal(sig, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    kill(getpid(), sig);
}

/* Leave as a process with wait status ``status`` did: by the same signal,
 * or with the same exit code (128 + SIGSYS, what seccomp=trap's handler
 * exits with when it cannot die of its own signal, as SIGSYS). */
static void leave_as(int status)
{
    if (WIFSIGNALED(status)) {
        die_of(WTERMSIG(status));
        _exit(-WTERMSIG(status) & 0xFF);
    }
    int code = WEXITSTATUS(status);
    if (code == 128 + SIGSYS)
        die_of(SIGSYS);
    _exit(code);
}

static void reap_outer(pid_t pid, int pidfd, int status_fd, pid_t parent)
{
    struct pollfd p = { .fd = pidfd, .events = POLLIN };
    for (;;) {
        if (getppid() != parent) {
            syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
            _exit(0);
        }
        int n = poll(&p, 1, PARENT_CHECK_MS);
        if (n > 0)
            break;
        if (n < 0 && errno != EINTR)
            fail("poll");
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            fail("waitpid");
    }
    int32_t passed;
    ssize_t n;
    while ((n = read(status_fd, &passed, sizeof passed)) < 0 && errno == EINTR)
        ;
    if (n == sizeof passed)
        status = passed;
    leave_as(status);
}

static void reap_inner(pid_t device, int status_fd)
{
    int status;
    for (;;) {
        pid_t pid = waitpid(-1, &status, 0);
        if (pid == device)
            break;
        if (pid < 0 && errno == ECHILD)
            _exit(1);
    }
    int32_t out = status;
    ssize_t r = write(status_fd, &out, sizeof out);
    (void)r;
    _exit(WIFSIGNALED(status) ? 1 : WEXITSTATUS(status));
}

int main(int argc, char **argv)
{
    if (argc == 7 && !strcmp(argv[1], "outer")) {
        pid_t pid = (pid_t)number(argv[2]);
        int pidfd = (int)number(argv[3]), status_fd = (int)number(argv[4]), forward = (int)number(argv[6]);
        pid_t parent = (pid_t)number(argv[5]);
        outer = 1;
        forward_to = pidfd;
        lock_down(pidfd, -1, forward);
        if (forward)
            forward_sigterm();
        reap_outer(pid, pidfd, status_fd, parent);
    } else if (argc == 5 && !strcmp(argv[1], "inner")) {
        pid_t device = (pid_t)number(argv[2]);
        int status_fd = (int)number(argv[3]), forward = (int)number(argv[4]);
        forward_to = device;
        lock_down(-1, device, forward);
        if (forward)
            forward_sigterm();
        reap_inner(device, status_fd);
    }
    fail("usage: _reaper outer PID PIDFD STATUS_FD PARENT FORWARD | inner DEVICE STATUS_FD FORWARD");
    return 1;
}
