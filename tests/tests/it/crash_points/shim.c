/*
 * Crash-point shim for tests/tests/it/crash_points.rs, loaded into `ddi-agent` with LD_PRELOAD.
 *
 * It sees every durable step of the agent and numbers them across all agent processes of one
 * update cycle (the number lives in a counter file):
 *   - "state": a rename into the state directory (the commit of an atomic state-file write:
 *     temp file, fsync, rename) and an unlink of an existing file there;
 *   - "env": a write to the U-Boot environment file through a descriptor opened for writing
 *     (one save writes one copy with one pwrite).
 * Every step is appended to a log ("<index> <kind> <file> <run>"). When the step's index is
 * DDI_CRASH_AT the process dies right before it with SIGKILL (a power cut: nothing after it
 * runs, no buffers are flushed); with DDI_CRASH_TORN=1 an env step first writes the first half
 * of the bytes it changes (a torn save, logged as "TORN ..."). The log then ends with
 * "CUT <index>".
 *
 * Environment: DDI_CRASH_COUNTER (counter file; without it the shim does nothing),
 * DDI_CRASH_LOG, DDI_CRASH_ENV_FILE, DDI_CRASH_STATE_DIR, DDI_CRASH_RUN (label of this
 * agent run), DDI_CRASH_AT, DDI_CRASH_TORN. LD_PRELOAD is removed from the environment at
 * load, so programs the agent starts (health checks, the reboot command) run without it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FDS 4096

static int active;
static char counter_path[PATH_MAX];
static char log_path[PATH_MAX];
static char state_dir[PATH_MAX];
static char env_path[PATH_MAX];
static char run_label[64];
static long cut_at = -1;
static int torn;
static dev_t env_dev;
static ino_t env_ino;
static unsigned char env_fds[MAX_FDS];

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwrite64_fn)(int, const void *, size_t, off64_t);
typedef int (*rename_fn)(const char *, const char *);
typedef int (*renameat_fn)(int, const char *, int, const char *);
typedef int (*renameat2_fn)(int, const char *, int, const char *, unsigned int);
typedef int (*unlink_fn)(const char *);
typedef int (*unlinkat_fn)(int, const char *, int);
typedef int (*close_fn)(int);

static void *next(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) {
        fprintf(stderr, "crash shim: no %s in libc\n", name);
        abort();
    }
    return f;
}

static void copy_env(char *dst, size_t len, const char *name) {
    const char *v = getenv(name);
    snprintf(dst, len, "%s", v ? v : "");
}

__attribute__((constructor)) static void crash_shim_init(void) {
    if (!getenv("DDI_CRASH_COUNTER"))
        return;
    copy_env(counter_path, sizeof counter_path, "DDI_CRASH_COUNTER");
    copy_env(log_path, sizeof log_path, "DDI_CRASH_LOG");
    copy_env(state_dir, sizeof state_dir, "DDI_CRASH_STATE_DIR");
    copy_env(run_label, sizeof run_label, "DDI_CRASH_RUN");
    const char *at = getenv("DDI_CRASH_AT");
    if (at && *at)
        cut_at = strtol(at, NULL, 10);
    const char *t = getenv("DDI_CRASH_TORN");
    torn = t && strcmp(t, "1") == 0;
    struct stat st;
    const char *env_file = getenv("DDI_CRASH_ENV_FILE");
    if (!env_file || stat(env_file, &st) != 0) {
        fprintf(stderr, "crash shim: DDI_CRASH_ENV_FILE missing or unreadable\n");
        abort();
    }
    snprintf(env_path, sizeof env_path, "%s", env_file);
    env_dev = st.st_dev;
    env_ino = st.st_ino;
    unsetenv("LD_PRELOAD");
    active = 1;
}

/*
 * Appends one line to the log (its descriptor is never an env descriptor, so the wrappers pass
 * its write through). Nothing here is fsynced: the test reads the log and the counter after the
 * agent died, from the same page cache; only the agent's own durability is under test.
 */
static void log_line(const char *line) {
    static open_fn real_open;
    if (!real_open)
        real_open = (open_fn)next("open");
    int fd = real_open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        abort();
    size_t len = strlen(line);
    if (write(fd, line, len) != (ssize_t)len)
        abort();
    close(fd);
}

/* The index of the step about to happen; counts it. */
static long take_step(void) {
    static open_fn real_open;
    if (!real_open)
        real_open = (open_fn)next("open");
    int fd = real_open(counter_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || flock(fd, LOCK_EX) != 0)
        abort();
    char buf[32] = {0};
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    long index = n > 0 ? strtol(buf, NULL, 10) : 0;
    int len = snprintf(buf, sizeof buf, "%ld\n", index + 1);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, len, 0) != len)
        abort();
    close(fd);
    return index;
}

/* Logs the step; returns 1 when the process must die before it. */
static int step(const char *kind, const char *file) {
    long index = take_step();
    char line[PATH_MAX + 128];
    snprintf(line, sizeof line, "%ld %s %s %s\n", index, kind, file, run_label);
    log_line(line);
    return index == cut_at;
}

static void die(long index) {
    char line[64];
    snprintf(line, sizeof line, "CUT %ld\n", index);
    log_line(line);
    kill(getpid(), SIGKILL);
    _exit(137);
}

static int is_env_fd(int fd) {
    return active && fd >= 0 && fd < MAX_FDS && env_fds[fd];
}

static void track(int fd, int flags) {
    if (!active || fd < 0 || fd >= MAX_FDS)
        return;
    env_fds[fd] = 0;
    if ((flags & O_ACCMODE) == O_RDONLY)
        return;
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_dev == env_dev && st.st_ino == env_ino)
        env_fds[fd] = 1;
}

/*
 * A torn save: of the bytes this write changes on the medium (from the copy's header, whose
 * CRC always changes, to the last changed byte), only the first half arrives. Half of the
 * whole buffer would often be a complete save, as the end of a copy is padding that does not
 * change; "cut right before the next step" already covers a complete save.
 */
static void tear(int fd, const void *buf, size_t count, off64_t offset) {
    static open_fn real_open;
    static pwrite64_fn real_pwrite64;
    if (!real_open)
        real_open = (open_fn)next("open");
    if (!real_pwrite64)
        real_pwrite64 = (pwrite64_fn)next("pwrite64");
    if (offset < 0)
        offset = lseek(fd, 0, SEEK_CUR);
    unsigned char *old = calloc(count ? count : 1, 1);
    int in = real_open(env_path, O_RDONLY | O_CLOEXEC);
    if (!old || in < 0 || pread(in, old, count, offset) < 0)
        abort();
    close(in);
    size_t changed = count;
    while (changed > 0 && old[changed - 1] == ((const unsigned char *)buf)[changed - 1])
        changed--;
    size_t half = (changed + 1) / 2;
    if (real_pwrite64(fd, buf, half, offset) != (ssize_t)half)
        abort();
    fdatasync(fd);
    char line[96];
    snprintf(line, sizeof line, "TORN %zu of %zu changed bytes written\n", half, changed);
    log_line(line);
}

/* Before an env write of `count` bytes at `offset` (-1: the file position). */
static void before_env_write(int fd, const void *buf, size_t count, off64_t offset) {
    if (!step("env", "uboot.env"))
        return;
    if (torn)
        tear(fd, buf, count, offset);
    die(cut_at);
}

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* A path in the state directory (the agent uses absolute paths from its config). */
static int in_state_dir(const char *path) {
    size_t len = strlen(state_dir);
    return active && len > 0 && path && strncmp(path, state_dir, len) == 0 && path[len] == '/' &&
           strchr(path + len + 1, '/') == NULL;
}

static void before_rename(const char *to) {
    if (in_state_dir(to) && step("state", base_name(to)))
        die(cut_at);
}

static void before_unlink(const char *path) {
    struct stat st;
    if (in_state_dir(path) && lstat(path, &st) == 0 && step("state-remove", base_name(path)))
        die(cut_at);
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int flags, ...) {
    static open_fn real;
    if (!real)
        real = (open_fn)next("open");
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real(path, flags, mode);
    track(fd, flags);
    return fd;
}

int open64(const char *path, int flags, ...) {
    static open_fn real;
    if (!real)
        real = (open_fn)next("open64");
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real(path, flags, mode);
    track(fd, flags);
    return fd;
}

int openat(int dir, const char *path, int flags, ...) {
    static openat_fn real;
    if (!real)
        real = (openat_fn)next("openat");
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real(dir, path, flags, mode);
    track(fd, flags);
    return fd;
}

int openat64(int dir, const char *path, int flags, ...) {
    static openat_fn real;
    if (!real)
        real = (openat_fn)next("openat64");
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    int fd = real(dir, path, flags, mode);
    track(fd, flags);
    return fd;
}

/* A closed descriptor number is reused for sockets, pipes and other files: forget it. */
int close(int fd) {
    static close_fn real;
    if (!real)
        real = (close_fn)next("close");
    if (fd >= 0 && fd < MAX_FDS)
        env_fds[fd] = 0;
    return real(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static write_fn real;
    if (!real)
        real = (write_fn)next("write");
    if (is_env_fd(fd))
        before_env_write(fd, buf, count, -1);
    return real(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    static pwrite_fn real;
    if (!real)
        real = (pwrite_fn)next("pwrite");
    if (is_env_fd(fd))
        before_env_write(fd, buf, count, offset);
    return real(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    static pwrite64_fn real;
    if (!real)
        real = (pwrite64_fn)next("pwrite64");
    if (is_env_fd(fd))
        before_env_write(fd, buf, count, offset);
    return real(fd, buf, count, offset);
}

int rename(const char *from, const char *to) {
    static rename_fn real;
    if (!real)
        real = (rename_fn)next("rename");
    before_rename(to);
    return real(from, to);
}

int renameat(int from_dir, const char *from, int to_dir, const char *to) {
    static renameat_fn real;
    if (!real)
        real = (renameat_fn)next("renameat");
    if (to_dir == AT_FDCWD)
        before_rename(to);
    return real(from_dir, from, to_dir, to);
}

int renameat2(int from_dir, const char *from, int to_dir, const char *to, unsigned int flags) {
    static renameat2_fn real;
    if (!real)
        real = (renameat2_fn)next("renameat2");
    if (to_dir == AT_FDCWD)
        before_rename(to);
    return real(from_dir, from, to_dir, to, flags);
}

int unlink(const char *path) {
    static unlink_fn real;
    if (!real)
        real = (unlink_fn)next("unlink");
    before_unlink(path);
    return real(path);
}

int unlinkat(int dir, const char *path, int flags) {
    static unlinkat_fn real;
    if (!real)
        real = (unlinkat_fn)next("unlinkat");
    if (dir == AT_FDCWD && !(flags & AT_REMOVEDIR))
        before_unlink(path);
    return real(dir, path, flags);
}
