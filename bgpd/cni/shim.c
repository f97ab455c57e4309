/*
 * calico-py / calico-py-ipam: the CNI plugins as a C shim to the node daemon, so a runtime pays about a
 * millisecond of process start instead of an interpreter's fifteen. shim.py is the reference and the fallback
 * where no C compiler exists; this file must answer byte for byte as it does (the tests compare them).
 *
 * It answers VERSION itself; anything else goes to the daemon of this network namespace on the abstract unix
 * socket @calico-py-cni in the wire format of docs/cni.md (shim.py is its Python definition):
 *   request: "CNI2\0" plugin "\0" netns-field "\0" { "CNI_NAME=VALUE\0" } "\0" stdin-bytes, then a half-close;
 *   answer:  exit-code-in-decimal "\n" stdout-bytes, up to EOF.
 * The netns field is this process's open(CNI_NETNS): "0" with the descriptor on the first bytes (SCM_RIGHTS), else
 * the errno in decimal, empty without CNI_NETNS. The shim has the runtime's privileges; the daemon opens no path.
 *
 * libc only, C99. bgpd/cni/install.py builds it: cc -std=c11 -O2 -s [-static].
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define SOCKET_NAME "calico-py-cni" /* abstract: sun_path[0] is NUL */
#define TIMEOUT_SECONDS 150         /* as shim.py: beyond the daemon's own datastore deadlines */
#define TRY_AGAIN_LATER 11
#define IO_FAILURE 5
#define MAGIC "CNI2"                /* + its NUL */
/* As shim.py: O_NONBLOCK so a FIFO under CNI_NETNS cannot hang the shim. */
#define NETNS_OPEN_FLAGS (O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
#define ENV_PREFIX "CNI_"

static const char VERSION_ANSWER[] =
    "{\"cniVersion\": \"1.1.0\", \"supportedVersions\": [\"0.3.0\", \"0.3.1\", \"0.4.0\", \"1.0.0\", \"1.1.0\"]}\n";

extern char **environ;

struct buf {
    char *data;
    size_t len, cap;
};

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static void out_of_memory(void)
{
    static const char answer[] = "{\"cniVersion\": \"1.1.0\", \"code\": 11, \"msg\": "
                                 "\"calico-py shim: out of memory; try again later\"}\n";
    write_all(STDOUT_FILENO, answer, sizeof answer - 1);
    exit(1);
}

static void reserve(struct buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra)
        cap *= 2;
    char *data = realloc(b->data, cap);
    if (data == NULL)
        out_of_memory();
    b->data = data;
    b->cap = cap;
}

static void add(struct buf *b, const char *data, size_t len)
{
    reserve(b, len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

/* The string with its terminating NUL: the framing's separator. */
static void add_z(struct buf *b, const char *s) { add(b, s, strlen(s) + 1); }

static void add_s(struct buf *b, const char *s) { add(b, s, strlen(s)); }

/* A JSON string literal as Python's json.dumps writes it (ASCII only; the texts here are). */
static void add_json_string(struct buf *b, const char *s)
{
    add_s(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        switch (c) {
        case '"': add_s(b, "\\\""); break;
        case '\\': add_s(b, "\\\\"); break;
        case '\n': add_s(b, "\\n"); break;
        case '\r': add_s(b, "\\r"); break;
        case '\t': add_s(b, "\\t"); break;
        case '\b': add_s(b, "\\b"); break;
        case '\f': add_s(b, "\\f"); break;
        default:
            if (c < 0x20 || c >= 0x7f) {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                add_s(b, esc);
            } else {
                add(b, (const char *)&c, 1);
            }
        }
    }
    add_s(b, "\"");
}

/* A CNI error on stdout, exit 1: the same bytes shim.py's _error writes. */
static int error(int code, const char *msg, const char *details)
{
    struct buf out = {0};
    char num[16];
    snprintf(num, sizeof num, "%d", code);
    add_s(&out, "{\"cniVersion\": \"1.1.0\", \"code\": ");
    add_s(&out, num);
    add_s(&out, ", \"msg\": ");
    add_json_string(&out, msg);
    if (details != NULL && *details) {
        add_s(&out, ", \"details\": ");
        add_json_string(&out, details);
    }
    add_s(&out, "}\n");
    write_all(STDOUT_FILENO, out.data, out.len);
    free(out.data);
    return 1;
}

/* The whole buffer, the descriptor (if any, fd >= 0) riding on its first bytes. */
static int send_request(int sock, const char *data, size_t len, int fd)
{
    if (fd >= 0) {
        union {
            struct cmsghdr header;
            char space[CMSG_SPACE(sizeof(int))];
        } control;
        memset(&control, 0, sizeof control);
        struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof control.space};
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
        ssize_t n;
        do
            n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return write_all(sock, data, len);
}

static int not_answered(int err)
{
    if (err == EAGAIN || err == EWOULDBLOCK) /* what SO_RCVTIMEO / SO_SNDTIMEO expiring looks like */
        err = ETIMEDOUT;
    return error(TRY_AGAIN_LATER, "calico-py node daemon did not answer; try again later", strerror(err));
}

/* The exit code line of an answer: its value (0-255) and where stdout starts, or -1. */
static int parse_exit_code(const struct buf *answer, size_t *body)
{
    int code = 0;
    size_t i = 0;
    for (; i < answer->len && i <= 3 && answer->data[i] >= '0' && answer->data[i] <= '9'; i++)
        code = code * 10 + (answer->data[i] - '0');
    if (i == 0 || i > 3 || i >= answer->len || answer->data[i] != '\n' || code > 255)
        return -1;
    *body = i + 1;
    return code;
}

static int request(const char *plugin)
{
    struct buf req = {0}, answer = {0};
    add(&req, MAGIC, sizeof MAGIC); /* with its NUL */
    add_z(&req, plugin);
    const char *netns = getenv("CNI_NETNS");
    int netns_fd = -1;
    if (netns != NULL && *netns) {
        char field[16];
        netns_fd = open(netns, NETNS_OPEN_FLAGS);
        snprintf(field, sizeof field, "%d", netns_fd >= 0 ? 0 : errno);
        add_z(&req, field);
    } else {
        add(&req, "", 1);
    }
    for (char **env = environ; *env != NULL; env++)
        if (strncmp(*env, ENV_PREFIX, strlen(ENV_PREFIX)) == 0)
            add_z(&req, *env);
    add(&req, "", 1);
    for (;;) {
        reserve(&req, 65536);
        ssize_t n = read(STDIN_FILENO, req.data + req.len, req.cap - req.len);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return error(IO_FAILURE, "calico-py shim could not read its stdin", strerror(errno));
        }
        req.len += (size_t)n;
    }

    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return not_answered(errno);
    struct timeval timeout = {.tv_sec = TIMEOUT_SECONDS, .tv_usec = 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) < 0)
        return not_answered(errno);
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path + 1, SOCKET_NAME, strlen(SOCKET_NAME)); /* abstract: the name is exactly these bytes */
    socklen_t addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(SOCKET_NAME));
    int rc;
    do
        rc = connect(fd, (struct sockaddr *)&addr, addrlen);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        if (errno == ENOENT || errno == ECONNREFUSED)
            return error(TRY_AGAIN_LATER, "calico-py node daemon is not running on this node; try again later",
                         "no listener on the abstract socket @" SOCKET_NAME " in this network namespace");
        return not_answered(errno);
    }
    if (send_request(fd, req.data, req.len, netns_fd) < 0 || shutdown(fd, SHUT_WR) < 0)
        return not_answered(errno);
    free(req.data);
    if (netns_fd >= 0)
        close(netns_fd);

    for (;;) {
        reserve(&answer, 65536);
        ssize_t n = read(fd, answer.data + answer.len, answer.cap - answer.len);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return not_answered(errno);
        }
        answer.len += (size_t)n;
    }
    close(fd);

    size_t body;
    int code = parse_exit_code(&answer, &body);
    if (code < 0) {
        char details[80];
        snprintf(details, sizeof details, "no exit code line at the start of its %zu-byte answer", answer.len);
        return error(IO_FAILURE, "calico-py node daemon gave a malformed answer", details);
    }
    if (write_all(STDOUT_FILENO, answer.data + body, answer.len - body) < 0) {
        perror("calico-py: writing stdout");
        return 1;
    }
    return code;
}

int main(int argc, char **argv)
{
    (void)argc;
    /* A daemon that goes away mid-request must give a CNI error, not a silent death by SIGPIPE. */
    signal(SIGPIPE, SIG_IGN);
    const char *command = getenv("CNI_COMMAND");
    if (command != NULL && strcmp(command, "VERSION") == 0)
        return write_all(STDOUT_FILENO, VERSION_ANSWER, sizeof VERSION_ANSWER - 1) < 0 ? 1 : 0;
    const char *name = argv[0] != NULL ? argv[0] : "";
    const char *base = strrchr(name, '/');
    base = base != NULL ? base + 1 : name;
    size_t len = strlen(base);
    int ipam = len >= 5 && strcmp(base + len - 5, "-ipam") == 0;
    return request(ipam ? "calico-py-ipam" : "calico-py");
}
