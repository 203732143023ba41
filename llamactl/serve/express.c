/* The express lane of llamactl's proxy (docs/proxy.md, "The express lane").
 *
 * A thread of its own, with its own epoll loop, that accepts the proxy's TCP connections and
 * serves one kind of exchange without Python: a plain POST to a route llama-server answers in
 * its HTTP thread without a slot (/tokenize, /detokenize, /apply-template), for a model whose
 * llama-server the proxy has already routed to (a "learned" route). Anything else, and any
 * doubt, hands the connection to the Python proxy with the bytes read so far (xl_take): the
 * lane never answers a client itself, so every error answer stays the Python proxy's. The
 * Python proxy hands a connection back (xl_give) when it was handed one for a route the lane
 * did not know yet.
 *
 * Loaded with ctypes (serve/express.py), which releases the GIL around every call; the
 * thread never calls into Python. One mutex guards what both sides touch: the route table,
 * the journal of finished exchanges, and the handoff queues.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define XL_VERSION 1
#define MAX_SLOTS 256
#define MAX_NAMES 256
#define NAME_MAX_LEN 200
#define MAX_HOSTS 64
#define HOST_MAX_LEN 256
#define MAX_KEYS 16
#define KEY_MAX_LEN 512
#define MAX_LISTEN 16
#define HEAD_MAX 16384          /* a longer request head goes to Python */
#define BODY_MAX (256 * 1024)   /* so does a larger body */
#define IN_MAX (HEAD_MAX + BODY_MAX)
#define RESP_HEAD_MAX 65536
#define OUT_HIGH (256 * 1024)   /* stop reading llama-server while this much waits for a client */
#define JOURNAL 65536
#define PARTIAL_MS 1000         /* a request still arriving after this goes to Python */

/* Why a connection was handed to Python. */
enum { XL_OTHER = 0, XL_MISS = 1, XL_FAILED = 2 };

enum { K_LISTEN = 1, K_CLIENT, K_UP, K_WAKE };
enum { UP_CONNECTING = 1, UP_SENDING, UP_HEAD, UP_BODY, UP_IDLE };
enum { F_NONE = 0, F_LENGTH, F_CHUNKED, F_CLOSE };
enum {
    CH_SIZE = 0, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF,
    CH_TRAILER, CH_TRAILER_LINE, CH_TRAILER_LF, CH_DONE
};

typedef struct tag { int kind; int dead; } tag_t;

struct up;
struct conn;

typedef struct slot {
    int used;                 /* registered by Python (xl_upstream) */
    int gen;                  /* bumped on each reuse: Python's (slot, gen) names one upstream */
    int retired;              /* no name leads here any more (xl_clear) */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char auth[KEY_MAX_LEN + 32]; /* "Authorization: Bearer ...\r\n" or "" */
    int authlen;
    int in_flight;
    int records;              /* journal records not yet drained */
    int conns;                /* open connections to it */
    struct up *idle;          /* pooled keep-alive connections */
    int nidle;
} slot_t;

typedef struct up {
    tag_t tag;
    int fd;
    int slot;
    int phase;
    struct conn *client;
    char *out; size_t out_len, out_off;   /* the request, while it is being sent */
    char *in; size_t in_len, in_cap;      /* the response head, while it is being read */
    int framing;
    uint64_t remaining;                   /* F_LENGTH: body bytes still to come */
    int ch; uint64_t ch_left;             /* F_CHUNKED: where in the chunk framing */
    int close_after;                      /* llama-server said Connection: close */
    int fresh;                            /* connected for this exchange */
    int epoll_out;                        /* EPOLLOUT is in the interest set */
    struct up *grave;
    uint64_t stamp;
    struct up *next;                      /* in a slot's idle list */
} up_t;

typedef struct conn {
    tag_t tag;
    int fd;
    char *in; size_t in_len, in_cap;      /* client bytes not yet taken by an exchange */
    char *out; size_t out_len, out_off, out_cap; /* bytes waiting for the client */
    int busy;                             /* an exchange is under way */
    int epoll_in;                         /* EPOLLIN is in the interest set */
    int epoll_out;
    size_t req_len;                       /* the current request's bytes at the start of in */
    int slot;
    int head_sent;                        /* a byte of the answer went to the client */
    int close_after;                      /* close once the answer is out */
    int status;
    uint64_t t0;                          /* the exchange's start (ns) */
    uint64_t stamp;                       /* last sign of life (ms) */
    uint64_t partial_since;               /* ms when a request started to arrive; 0: none */
    int force_fresh;                      /* retrying on a new connection to llama-server */
    up_t *up;
    struct conn *grave;
    struct conn *prev, *next;             /* every client connection, for the sweep */
} conn_t;

typedef struct handoff {
    int fd, reason;
    size_t len;
    char *data;
    struct handoff *next;
} handoff_t;

typedef struct name { char s[NAME_MAX_LEN]; int len; int slot; } name_t;

typedef struct lane {
    pthread_mutex_t mu;
    pthread_t thread;
    int started, stopping;
    int ep, wake, notify;
    tag_t wake_tag;
    int nlisten;
    int listen_fd[MAX_LISTEN];
    tag_t listen_tag[MAX_LISTEN];
    /* configuration */
    int max_conns;
    uint64_t keepalive_ms, upstream_ms, connect_ms;
    int hosts_any;
    char hosts[MAX_HOSTS][HOST_MAX_LEN]; int hostlen[MAX_HOSTS]; int nhosts;
    char keys[MAX_KEYS][KEY_MAX_LEN]; int keylen[MAX_KEYS]; int nkeys;
    /* routes */
    slot_t slots[MAX_SLOTS];
    name_t names[MAX_NAMES]; int nnames;
    /* journal of finished exchanges: slot, status, microseconds */
    uint32_t journal[JOURNAL][3]; size_t jhead, jlen; uint64_t jlost;
    /* handoffs */
    handoff_t *to_py, *to_py_tail;
    int queued;          /* handoffs Python has not taken yet */
    handoff_t *to_lane;
    /* counters */
    uint64_t requests, handed, taken_back;
    int conns, in_flight;
    int py_conns;        /* client connections the Python proxy holds (xl_python_conns) */
    int py_refusing;     /* and those it is turning away with a 503 */
    conn_t *all;
    conn_t *grave_c;     /* closed in this turn of the loop: freed after it */
    up_t *grave_u;
} lane_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static uint64_t now_ms(void) { return now_ns() / 1000000ull; }

static void ep_set(lane_t *l, int fd, void *ptr, uint32_t events, int op) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.ptr = ptr;
    epoll_ctl(l->ep, op, fd, &ev);
}

static void notify_python(lane_t *l) {
    uint64_t one = 1;
    ssize_t r = write(l->notify, &one, sizeof one);
    (void)r;
}

/* -- the client side ------------------------------------------------------------------------ */

static void conn_interest(lane_t *l, conn_t *c, int want_in, int want_out) {
    if (want_in == c->epoll_in && want_out == c->epoll_out) return;
    c->epoll_in = want_in;
    c->epoll_out = want_out;
    ep_set(l, c->fd, c, (want_in ? EPOLLIN : 0) | (want_out ? EPOLLOUT : 0) | EPOLLRDHUP,
           EPOLL_CTL_MOD);
}

static void conn_unlink(lane_t *l, conn_t *c) {
    if (c->prev) c->prev->next = c->next; else l->all = c->next;
    if (c->next) c->next->prev = c->prev;
    pthread_mutex_lock(&l->mu);
    l->conns--;
    pthread_mutex_unlock(&l->mu);
}

/* Freed after the loop's turn: an event of the same batch may still name it. */
static void conn_bury(lane_t *l, conn_t *c) {
    c->tag.dead = 1;
    c->grave = l->grave_c;
    l->grave_c = c;
}

static void reap(lane_t *l) {
    while (l->grave_c) {
        conn_t *c = l->grave_c;
        l->grave_c = c->grave;
        free(c->in);
        free(c->out);
        free(c);
    }
    while (l->grave_u) {
        up_t *u = l->grave_u;
        l->grave_u = u->grave;
        free(u->out);
        free(u->in);
        free(u);
    }
}

static void up_close(lane_t *l, up_t *u);
static void finish_exchange(lane_t *l, conn_t *c, int status, int pool);

static void conn_close(lane_t *l, conn_t *c) {
    if (c->busy) finish_exchange(l, c, c->head_sent ? 0 : 499, 0);
    epoll_ctl(l->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conn_unlink(l, c);
    conn_bury(l, c);
}

/* Give the connection to Python with every byte read from it that no exchange has taken. */
static void handoff(lane_t *l, conn_t *c, int reason) {
    handoff_t *h = calloc(1, sizeof *h);
    if (!h) { conn_close(l, c); return; }
    epoll_ctl(l->ep, EPOLL_CTL_DEL, c->fd, NULL);
    h->fd = c->fd;
    h->reason = reason;
    h->len = c->in_len;
    h->data = c->in;
    c->in = NULL;
    c->in_len = c->in_cap = 0;
    conn_unlink(l, c);
    conn_bury(l, c);
    pthread_mutex_lock(&l->mu);
    if (l->to_py_tail) l->to_py_tail->next = h; else l->to_py = h;
    l->to_py_tail = h;
    l->handed++;
    l->queued++;
    pthread_mutex_unlock(&l->mu);
    notify_python(l);
}

static conn_t *conn_new(lane_t *l, int fd) {
    conn_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->tag.kind = K_CLIENT;
    c->fd = fd;
    c->stamp = now_ms();
    c->epoll_in = 1;
    c->next = l->all;
    if (l->all) l->all->prev = c;
    l->all = c;
    pthread_mutex_lock(&l->mu);
    l->conns++;
    pthread_mutex_unlock(&l->mu);
    ep_set(l, fd, c, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_ADD);
    return c;
}

/* Queue bytes for the client and write what the socket takes now. 0: ok, -1: the client is
 * gone. */
static int conn_write(lane_t *l, conn_t *c, const char *data, size_t len) {
    if (c->out_len == c->out_off) {
        c->out_len = c->out_off = 0;
        while (len > 0) {
            ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
            if (n > 0) { data += n; len -= (size_t)n; continue; }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            return -1;
        }
        if (len == 0) return 0;
    }
    if (c->out_len + len > c->out_cap) {
        size_t keep = c->out_len - c->out_off;
        size_t cap = c->out_cap ? c->out_cap : 16384;
        while (cap < keep + len) cap *= 2;
        char *buf = malloc(cap);
        if (!buf) return -1;
        if (keep) memcpy(buf, c->out + c->out_off, keep);
        free(c->out);
        c->out = buf;
        c->out_cap = cap;
        c->out_len = keep;
        c->out_off = 0;
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    conn_interest(l, c, c->epoll_in, 1);
    return 0;
}

static size_t conn_pending(conn_t *c) { return c->out_len - c->out_off; }

/* -- routes --------------------------------------------------------------------------------- */

static int find_name(lane_t *l, const char *s, int len) {
    for (int i = 0; i < l->nnames; i++) {
        name_t *n = &l->names[i];
        if (n->len == len && (len <= 0 || memcmp(n->s, s, (size_t)len) == 0)) return n->slot;
    }
    return -1;
}

static void journal_add(lane_t *l, int slot, int status, uint64_t elapsed_ns) {
    if (l->jlen == JOURNAL) { l->jlost++; return; }
    size_t i = (l->jhead + l->jlen) % JOURNAL;
    l->journal[i][0] = (uint32_t)slot;
    l->journal[i][1] = (uint32_t)status;
    uint64_t us = elapsed_ns / 1000;
    l->journal[i][2] = us > 0xffffffffu ? 0xffffffffu : (uint32_t)us;
    l->jlen++;
    l->slots[slot].records++;
}

/* -- JSON: is the body a valid JSON object, and what is its top-level "model"? ---------------
 * Strict RFC 8259 over strict UTF-8; anything the checker is unsure of (escapes in a key or in
 * the model's name, NaN, deep nesting) answers "no", which sends the request to Python. */

typedef struct { const unsigned char *p, *end; int depth; } js_t;

static void js_ws(js_t *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int js_utf8(js_t *j) {
    const unsigned char *p = j->p, *e = j->end;
    unsigned char b = *p;
    int n;
    uint32_t cp;
    if (b < 0xC2) return 0;
    if (b < 0xE0) { n = 1; cp = b & 0x1F; }
    else if (b < 0xF0) { n = 2; cp = b & 0x0F; }
    else if (b < 0xF5) { n = 3; cp = b & 0x07; }
    else return 0;
    if (e - p <= n) return 0;
    for (int i = 1; i <= n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    j->p += n + 1;
    return 1;
}

/* A string; *escaped says whether it had a backslash. */
static int js_string(js_t *j, const unsigned char **s, size_t *len, int *escaped) {
    if (j->p >= j->end || *j->p != '"') return 0;
    j->p++;
    const unsigned char *start = j->p;
    *escaped = 0;
    while (j->p < j->end) {
        unsigned char b = *j->p;
        if (b == '"') {
            *s = start;
            *len = (size_t)(j->p - start);
            j->p++;
            return 1;
        }
        if (b < 0x20) return 0;
        if (b == '\\') {
            *escaped = 1;
            j->p++;
            if (j->p >= j->end) return 0;
            b = *j->p;
            if (b == 'u') {
                if (j->end - j->p < 5) return 0;
                for (int i = 1; i <= 4; i++) {
                    unsigned char h = j->p[i];
                    if (!((h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F')))
                        return 0;
                }
                j->p += 5;
            } else if (b == '"' || b == '\\' || b == '/' || b == 'b' || b == 'f' || b == 'n' ||
                       b == 'r' || b == 't') {
                j->p++;
            } else {
                return 0;
            }
        } else if (b < 0x80) {
            j->p++;
        } else if (!js_utf8(j)) {
            return 0;
        }
    }
    return 0;
}

static int js_digits(js_t *j) {
    const unsigned char *s = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') j->p++;
    return j->p > s;
}

static int js_number(js_t *j) {
    if (j->p < j->end && *j->p == '-') j->p++;
    if (j->p >= j->end) return 0;
    if (*j->p == '0') j->p++;
    else if (!js_digits(j)) return 0;
    if (j->p < j->end && *j->p == '.') { j->p++; if (!js_digits(j)) return 0; }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-')) j->p++;
        if (!js_digits(j)) return 0;
    }
    return 1;
}

static int js_lit(js_t *j, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n) != 0) return 0;
    j->p += n;
    return 1;
}

static int js_value(js_t *j);

static int js_object(js_t *j, const unsigned char **model, size_t *model_len, int *has_model) {
    if (++j->depth > 64) return 0;
    j->p++; /* { */
    js_ws(j);
    if (j->p < j->end && *j->p == '}') { j->p++; j->depth--; return 1; }
    for (;;) {
        const unsigned char *k; size_t klen; int kesc;
        js_ws(j);
        if (!js_string(j, &k, &klen, &kesc)) return 0;
        int is_model = model && klen == 5 && memcmp(k, "model", 5) == 0;
        if (model && kesc) return 0; /* a top-level key with escapes might spell "model" */
        js_ws(j);
        if (j->p >= j->end || *j->p != ':') return 0;
        j->p++;
        js_ws(j);
        if (is_model) {
            if (j->p < j->end && *j->p == '"') {
                const unsigned char *v; size_t vlen; int vesc;
                if (!js_string(j, &v, &vlen, &vesc) || vesc || vlen == 0 || vlen >= NAME_MAX_LEN)
                    return 0;
                *model = v; *model_len = vlen; *has_model = 1;
            } else if (js_lit(j, "null")) {
                *has_model = 0;
            } else {
                return 0; /* Python answers 400: `model` must be a string */
            }
        } else if (!js_value(j)) {
            return 0;
        }
        js_ws(j);
        if (j->p >= j->end) return 0;
        if (*j->p == ',') { j->p++; continue; }
        if (*j->p == '}') { j->p++; j->depth--; return 1; }
        return 0;
    }
}

static int js_array(js_t *j) {
    if (++j->depth > 64) return 0;
    j->p++;
    js_ws(j);
    if (j->p < j->end && *j->p == ']') { j->p++; j->depth--; return 1; }
    for (;;) {
        js_ws(j);
        if (!js_value(j)) return 0;
        js_ws(j);
        if (j->p >= j->end) return 0;
        if (*j->p == ',') { j->p++; continue; }
        if (*j->p == ']') { j->p++; j->depth--; return 1; }
        return 0;
    }
}

static int js_value(js_t *j) {
    if (j->p >= j->end) return 0;
    switch (*j->p) {
    case '{': return js_object(j, NULL, NULL, NULL);
    case '[': return js_array(j);
    case '"': { const unsigned char *s; size_t n; int e; return js_string(j, &s, &n, &e); }
    case 't': return js_lit(j, "true");
    case 'f': return js_lit(j, "false");
    case 'n': return js_lit(j, "null");
    default: return js_number(j);
    }
}

/* 1 when `body` is a JSON object the lane may route; *has_model and the model's bytes. */
static int json_model(const char *body, size_t len, const char **model, size_t *model_len,
                      int *has_model) {
    js_t j = {(const unsigned char *)body, (const unsigned char *)body + len, 0};
    const unsigned char *m = NULL;
    *has_model = 0;
    js_ws(&j);
    if (j.p >= j.end || *j.p != '{') return 0;
    if (!js_object(&j, &m, model_len, has_model)) return 0;
    js_ws(&j);
    if (j.p != j.end) return 0;
    *model = (const char *)m;
    return 1;
}

/* -- one request: parse its head, decide ------------------------------------------------------ */

static int ieq(const char *a, size_t alen, const char *b) {
    size_t n = strlen(b);
    return alen == n && strncasecmp(a, b, n) == 0;
}

static int is_tchar(unsigned char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int key_ok(lane_t *l, const char *v, size_t vlen) {
    if (vlen >= 7 && memcmp(v, "Bearer ", 7) == 0) { v += 7; vlen -= 7; }
    int ok = 0;
    for (int i = 0; i < l->nkeys; i++) {
        if ((size_t)l->keylen[i] != vlen) continue;
        unsigned char d = 0;
        for (size_t k = 0; k < vlen; k++) d |= (unsigned char)(v[k] ^ l->keys[i][k]);
        ok |= d == 0;
    }
    return ok;
}

static int host_ok(lane_t *l, const char *v, size_t vlen) {
    if (l->hosts_any) return 1;
    for (int i = 0; i < l->nhosts; i++)
        if ((size_t)l->hostlen[i] == vlen && memcmp(l->hosts[i], v, vlen) == 0) return 1;
    return 0;
}

static const char *EXPRESS_PATHS[] = {"/tokenize", "/detokenize", "/apply-template", NULL};

static void start_exchange(lane_t *l, conn_t *c, int slot, const char *req, size_t req_len);

/* Look at the bytes of the next request: serve it, wait for more, or hand the connection to
 * Python. */
static void next_request(lane_t *l, conn_t *c) {
    if (c->busy || c->in_len == 0 || __atomic_load_n(&l->stopping, __ATOMIC_RELAXED)) return;
    if (!c->partial_since) c->partial_since = now_ms();
    char *buf = c->in;
    size_t len = c->in_len;
    char *end = memmem(buf, len < HEAD_MAX ? len : HEAD_MAX, "\r\n\r\n", 4);
    if (!end) {
        if (len >= HEAD_MAX) handoff(l, c, XL_OTHER);
        else if (len >= 4 && memcmp(buf, "POST", 4) != 0) handoff(l, c, XL_OTHER);
        return;
    }
    size_t head_len = (size_t)(end - buf) + 4;
    /* request line */
    char *line_end = memmem(buf, head_len, "\r\n", 2);
    if (line_end - buf < 5 || memcmp(buf, "POST ", 5) != 0) { handoff(l, c, XL_OTHER); return; }
    char *target = buf + 5;
    char *sp = memchr(target, ' ', (size_t)(line_end - target));
    if (!sp || (size_t)(line_end - sp) != 9 || memcmp(sp, " HTTP/1.1", 9) != 0) {
        handoff(l, c, XL_OTHER);
        return;
    }
    size_t tlen = (size_t)(sp - target);
    int express = 0;
    for (int i = 0; EXPRESS_PATHS[i]; i++)
        if (tlen == strlen(EXPRESS_PATHS[i]) && memcmp(target, EXPRESS_PATHS[i], tlen) == 0)
            express = 1;
    if (!express) { handoff(l, c, XL_OTHER); return; }
    /* fields */
    const char *host = NULL, *authz = NULL, *xkey = NULL;
    size_t host_len = 0, authz_len = 0, xkey_len = 0;
    long long clen = -1;
    /* The forwarded fields: (start, length) of each whole line, CRLF included. */
    const char *fwd[64];
    size_t fwd_len[64];
    int nfwd = 0;
    const char *cred[2];
    size_t cred_len[2];
    int ncred = 0;
    char *p = line_end + 2;
    while (p < end + 2) {
        char *eol = memmem(p, (size_t)(end + 2 - p), "\r\n", 2);
        size_t ll = (size_t)(eol - p);
        char *colon = memchr(p, ':', ll);
        if (!colon || colon == p) { handoff(l, c, XL_OTHER); return; }
        for (char *q = p; q < colon; q++)
            if (!is_tchar((unsigned char)*q)) { handoff(l, c, XL_OTHER); return; }
        for (char *q = colon; q < eol; q++)
            if (*q == '\r' || *q == '\n' || *q == 0) { handoff(l, c, XL_OTHER); return; }
        size_t nlen = (size_t)(colon - p);
        const char *v = colon + 1;
        const char *ve = eol;
        while (v < ve && (*v == ' ' || *v == '\t')) v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
        size_t vlen = (size_t)(ve - v);
        if (ieq(p, nlen, "host")) {
            if (host) { handoff(l, c, XL_OTHER); return; }
            host = v; host_len = vlen;
        } else if (ieq(p, nlen, "content-length")) {
            if (clen >= 0 || vlen == 0 || vlen > 9) { handoff(l, c, XL_OTHER); return; }
            clen = 0;
            for (size_t k = 0; k < vlen; k++) {
                if (v[k] < '0' || v[k] > '9') { handoff(l, c, XL_OTHER); return; }
                clen = clen * 10 + (v[k] - '0');
            }
        } else if (ieq(p, nlen, "connection")) {
            if (!ieq(v, vlen, "keep-alive")) { handoff(l, c, XL_OTHER); return; }
        } else if (ieq(p, nlen, "keep-alive")) {
            /* hop-by-hop: dropped */
        } else if (ieq(p, nlen, "authorization")) {
            if (authz || ncred == 2) { handoff(l, c, XL_OTHER); return; }
            authz = v; authz_len = vlen;
            cred[ncred] = p; cred_len[ncred++] = ll + 2;
        } else if (ieq(p, nlen, "x-api-key")) {
            if (xkey || ncred == 2) { handoff(l, c, XL_OTHER); return; }
            xkey = v; xkey_len = vlen;
            cred[ncred] = p; cred_len[ncred++] = ll + 2;
        } else if (ieq(p, nlen, "content-type")) {
            if ((vlen >= 10 && strncasecmp(v, "multipart/", 10) == 0) ||
                (vlen >= 24 && strncasecmp(v, "application/octet-stream", 24) == 0)) {
                handoff(l, c, XL_OTHER);
                return;
            }
            if (nfwd == 64) { handoff(l, c, XL_OTHER); return; }
            fwd[nfwd] = p; fwd_len[nfwd++] = ll + 2;
        } else if (ieq(p, nlen, "transfer-encoding") || ieq(p, nlen, "expect") ||
                   ieq(p, nlen, "upgrade") || ieq(p, nlen, "te") || ieq(p, nlen, "trailer") ||
                   ieq(p, nlen, "proxy-connection") || ieq(p, nlen, "proxy-authorization") ||
                   ieq(p, nlen, "x-conversation-id")) {
            handoff(l, c, XL_OTHER);
            return;
        } else {
            if (nfwd == 64) { handoff(l, c, XL_OTHER); return; }
            fwd[nfwd] = p; fwd_len[nfwd++] = ll + 2;
        }
        p = eol + 2;
    }
    if (!host || clen <= 0 || clen > BODY_MAX) { handoff(l, c, XL_OTHER); return; }
    if (l->nkeys) {
        int ok = authz ? key_ok(l, authz, authz_len) : (xkey ? key_ok(l, xkey, xkey_len) : 0);
        if (!ok) { handoff(l, c, XL_OTHER); return; }
    }
    if (len < head_len + (size_t)clen) return; /* the body is still on its way */
    const char *body = buf + head_len;
    const char *model = NULL;
    size_t model_len = 0;
    int has_model = 0;
    if (!json_model(body, (size_t)clen, &model, &model_len, &has_model)) {
        handoff(l, c, XL_OTHER);
        return;
    }
    if (!host_ok(l, host, host_len)) { handoff(l, c, XL_MISS); return; }
    pthread_mutex_lock(&l->mu);
    int slot = find_name(l, model, has_model ? (int)model_len : -1);
    if (slot >= 0) {
        l->slots[slot].in_flight++;
        l->in_flight++;
        l->requests++;
    }
    pthread_mutex_unlock(&l->mu);
    if (slot < 0) { handoff(l, c, XL_MISS); return; }
    /* The request as it goes upstream: the client's fields but the hop-by-hop ones and the
     * credentials, llama-server's own key, and the body with its length. */
    slot_t *s = &l->slots[slot];
    size_t need = tlen + 32 + host_len + 16 + (size_t)s->authlen + 40 + (size_t)clen;
    for (int i = 0; i < nfwd; i++) need += fwd_len[i];
    for (int i = 0; i < ncred; i++) need += cred_len[i];
    char *req = malloc(need);
    if (!req) { conn_close(l, c); return; }
    size_t o = 0;
    memcpy(req + o, "POST ", 5); o += 5;
    memcpy(req + o, target, tlen); o += tlen;
    memcpy(req + o, " HTTP/1.1\r\n", 11); o += 11;
    for (int i = 0; i < nfwd; i++) { memcpy(req + o, fwd[i], fwd_len[i]); o += fwd_len[i]; }
    memcpy(req + o, "Host: ", 6); o += 6;
    memcpy(req + o, host, host_len); o += host_len;
    memcpy(req + o, "\r\n", 2); o += 2;
    if (s->authlen) {
        memcpy(req + o, s->auth, (size_t)s->authlen); o += (size_t)s->authlen;
    } else if (!l->nkeys) {
        for (int i = 0; i < ncred; i++) { memcpy(req + o, cred[i], cred_len[i]); o += cred_len[i]; }
    }
    o += (size_t)sprintf(req + o, "Content-Length: %lld\r\n\r\n", clen);
    memcpy(req + o, body, (size_t)clen); o += (size_t)clen;
    c->req_len = head_len + (size_t)clen;
    c->partial_since = 0;
    start_exchange(l, c, slot, req, o);
}

/* -- the upstream side ------------------------------------------------------------------------ */

static void up_close(lane_t *l, up_t *u) {
    epoll_ctl(l->ep, EPOLL_CTL_DEL, u->fd, NULL);
    close(u->fd);
    pthread_mutex_lock(&l->mu);
    l->slots[u->slot].conns--;
    pthread_mutex_unlock(&l->mu);
    u->tag.dead = 1;
    u->grave = l->grave_u;
    l->grave_u = u;
}

static up_t *up_pop(lane_t *l, int slot) {
    pthread_mutex_lock(&l->mu);
    slot_t *s = &l->slots[slot];
    up_t *u = s->retired ? NULL : s->idle;
    if (u) { s->idle = u->next; s->nidle--; u->next = NULL; }
    pthread_mutex_unlock(&l->mu);
    return u;
}

static up_t *up_connect(lane_t *l, int slot) {
    slot_t *s = &l->slots[slot];
    int fd = socket(s->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(fd, (struct sockaddr *)&s->addr, s->addrlen);
    if (r < 0 && errno != EINPROGRESS) { close(fd); return NULL; }
    up_t *u = calloc(1, sizeof *u);
    if (!u) { close(fd); return NULL; }
    u->tag.kind = K_UP;
    u->fd = fd;
    u->slot = slot;
    u->fresh = 1;
    u->phase = r == 0 ? UP_SENDING : UP_CONNECTING;
    u->epoll_out = r != 0;
    pthread_mutex_lock(&l->mu);
    s->conns++;
    pthread_mutex_unlock(&l->mu);
    ep_set(l, fd, u, EPOLLIN | EPOLLRDHUP | (r == 0 ? 0 : EPOLLOUT), EPOLL_CTL_ADD);
    return u;
}

/* Send what is left of the request; 0 sent or waiting, -1 failed. */
static int up_flush(lane_t *l, up_t *u) {
    while (u->out_off < u->out_len) {
        ssize_t n = send(u->fd, u->out + u->out_off, u->out_len - u->out_off, MSG_NOSIGNAL);
        if (n > 0) { u->out_off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!u->epoll_out) {
                u->epoll_out = 1;
                ep_set(l, u->fd, u, EPOLLIN | EPOLLRDHUP | EPOLLOUT, EPOLL_CTL_MOD);
            }
            return 0;
        }
        return -1;
    }
    if (u->epoll_out) {
        u->epoll_out = 0;
        ep_set(l, u->fd, u, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
    }
    u->phase = UP_HEAD;
    free(u->out);
    u->out = NULL;
    u->out_len = u->out_off = 0;
    return 0;
}

static void up_failed(lane_t *l, up_t *u);

static void start_exchange(lane_t *l, conn_t *c, int slot, const char *req, size_t req_len) {
    c->busy = 1;
    c->slot = slot;
    c->head_sent = 0;
    c->close_after = 0;
    c->status = 0;
    if (!c->force_fresh) c->t0 = now_ns();
    up_t *u = c->force_fresh ? NULL : up_pop(l, slot);
    if (!u) u = up_connect(l, slot);
    if (!u) {
        free((void *)req);
        /* Nothing listens: Python's path waits for the restart. */
        finish_exchange(l, c, -1, 0);
        return;
    }
    c->up = u;
    u->client = c;
    u->out = (char *)req;
    u->out_len = req_len;
    u->out_off = 0;
    u->in_len = 0;
    u->close_after = 0;
    u->stamp = now_ms();
    if (u->phase == UP_IDLE) u->phase = UP_SENDING;
    if (u->phase == UP_SENDING && up_flush(l, u) < 0) up_failed(l, u);
}

/* The exchange ended. status > 0: relayed whole; 0: cut short (the client sees its connection
 * closed); 499: the client left; -1: nothing reached the client and llama-server did not take
 * the request (hand the connection to Python, which decides again). */
static void finish_exchange(lane_t *l, conn_t *c, int status, int pool) {
    up_t *u = c->up;
    c->up = NULL;
    c->busy = 0;
    int slot = c->slot;
    if (u) {
        u->client = NULL;
        int keep = pool && !u->close_after;
        if (keep) {
            pthread_mutex_lock(&l->mu);
            slot_t *s = &l->slots[slot];
            if (!s->retired && s->nidle < 64) {
                u->in_len = 0; /* its buffer stays for the next answer's head */
                u->phase = UP_IDLE;
                u->fresh = 0;
                u->next = s->idle;
                s->idle = u;
                s->nidle++;
            } else {
                keep = 0;
            }
            pthread_mutex_unlock(&l->mu);
        }
        if (!keep) up_close(l, u);
    }
    pthread_mutex_lock(&l->mu);
    l->slots[slot].in_flight--;
    l->in_flight--;
    if (status >= 0) journal_add(l, slot, status, now_ns() - c->t0);
    if (status < 0) {
        l->requests--; /* Python answers it, and counts it */
        /* Its llama-server is gone or broken: no request goes there until Python has seen
         * to it (it drops every route on any change of state, then learns them again). */
        l->slots[slot].retired = 1;
        for (int i = 0; i < l->nnames; i++)
            if (l->names[i].slot == slot) l->names[i--] = l->names[--l->nnames];
    }
    pthread_mutex_unlock(&l->mu);
    c->force_fresh = 0;
    c->stamp = now_ms();
    if (status < 0) {
        handoff(l, c, XL_FAILED);
        return;
    }
    /* The request's bytes are taken: what follows them is the next request. */
    memmove(c->in, c->in + c->req_len, c->in_len - c->req_len);
    c->in_len -= c->req_len;
    c->req_len = 0;
}

/* The connection to llama-server failed before any byte of an answer: once more on a fresh
 * connection (a pooled one may have been closed by llama-server meanwhile), then Python. */
static void up_failed(lane_t *l, up_t *u) {
    conn_t *c = u->client;
    int fresh = u->fresh;
    u->client = NULL;
    if (!c) { up_close(l, u); return; }
    c->up = NULL;
    up_close(l, u);
    if (!fresh && !c->force_fresh) {
        /* The request is still in c->in: route and build it again, on a new connection. */
        c->busy = 0;
        pthread_mutex_lock(&l->mu);
        l->slots[c->slot].in_flight--;
        l->in_flight--;
        l->requests--;
        pthread_mutex_unlock(&l->mu);
        c->force_fresh = 1;
        next_request(l, c);
        return;
    }
    c->up = NULL;
    finish_exchange(l, c, -1, 0);
}

static int client_gone(lane_t *l, conn_t *c);

/* Relay body bytes; returns 1 when the response is complete. */
static int relay_body(lane_t *l, up_t *u, conn_t *c, const char *data, size_t len, int *fail) {
    size_t take = len;
    int done = 0;
    if (u->framing == F_LENGTH) {
        if (take >= u->remaining) { take = (size_t)u->remaining; done = 1; }
        u->remaining -= take;
    } else if (u->framing == F_CHUNKED) {
        size_t i = 0;
        for (; i < len && u->ch != CH_DONE; i++) {
            unsigned char b = (unsigned char)data[i];
            switch (u->ch) {
            case CH_SIZE:
                if (b >= '0' && b <= '9') u->ch_left = u->ch_left * 16 + (b - '0');
                else if (b >= 'a' && b <= 'f') u->ch_left = u->ch_left * 16 + (b - 'a' + 10);
                else if (b >= 'A' && b <= 'F') u->ch_left = u->ch_left * 16 + (b - 'A' + 10);
                else if (b == '\r') u->ch = CH_SIZE_LF;
                else if (b == ';' || b == ' ' || b == '\t') u->ch = CH_EXT;
                else { *fail = 1; return 0; }
                if (u->ch_left > (1ull << 40)) { *fail = 1; return 0; }
                break;
            case CH_EXT:
                if (b == '\r') u->ch = CH_SIZE_LF;
                break;
            case CH_SIZE_LF:
                if (b != '\n') { *fail = 1; return 0; }
                u->ch = u->ch_left ? CH_DATA : CH_TRAILER;
                break;
            case CH_DATA: {
                size_t n = len - i;
                if (n > u->ch_left) n = (size_t)u->ch_left;
                u->ch_left -= n;
                i += n - 1;
                if (!u->ch_left) u->ch = CH_DATA_CR;
                break;
            }
            case CH_DATA_CR:
                if (b != '\r') { *fail = 1; return 0; }
                u->ch = CH_DATA_LF;
                break;
            case CH_DATA_LF:
                if (b != '\n') { *fail = 1; return 0; }
                u->ch = CH_SIZE;
                break;
            case CH_TRAILER: /* at the start of a trailer line: an empty one ends it all */
                if (b == '\r') u->ch = CH_TRAILER_LF;
                else u->ch = CH_TRAILER_LINE;
                break;
            case CH_TRAILER_LINE:
                if (b == '\n') u->ch = CH_TRAILER;
                break;
            case CH_TRAILER_LF:
                if (b != '\n') { *fail = 1; return 0; }
                u->ch = CH_DONE;
                break;
            }
        }
        take = i;
        done = u->ch == CH_DONE;
    } else if (u->framing == F_NONE) {
        take = 0;
        done = 1;
    }
    if (take && conn_write(l, c, data, take) < 0) {
        client_gone(l, c);
        return -1;
    }
    return done;
}

/* Parse llama-server's response head in u->in; write the client's head and whatever body came
 * with it. */
static void up_head(lane_t *l, up_t *u, conn_t *c) {
    for (;;) {
        char *end = memmem(u->in, u->in_len, "\r\n\r\n", 4);
        if (!end) {
            if (u->in_len > RESP_HEAD_MAX) goto broken;
            return;
        }
        size_t head_len = (size_t)(end - u->in) + 4;
        char *line_end = memmem(u->in, head_len, "\r\n", 2);
        if (line_end - u->in < 12 || memcmp(u->in, "HTTP/1.", 7) != 0 || u->in[8] != ' ')
            goto broken;
        int status = 0;
        for (int i = 9; i < 12; i++) {
            if (u->in[i] < '0' || u->in[i] > '9') goto broken;
            status = status * 10 + (u->in[i] - '0');
        }
        int http10 = u->in[7] == '0';
        if (status < 200) { /* interim: not forwarded */
            memmove(u->in, u->in + head_len, u->in_len - head_len);
            u->in_len -= head_len;
            continue;
        }
        char *reason = u->in + 12;
        if (reason < line_end && *reason == ' ') reason++;
        size_t out_cap = head_len + 128;
        char *out = malloc(out_cap);
        if (!out) goto broken;
        size_t o = (size_t)snprintf(out, out_cap, "HTTP/1.1 %d ", status);
        memcpy(out + o, reason, (size_t)(line_end - reason));
        o += (size_t)(line_end - reason);
        memcpy(out + o, "\r\n", 2);
        o += 2;
        int has_len = 0, chunked = 0, sse = 0, conn_close = http10, keep_alive_word = 0;
        uint64_t clen = 0;
        char *p = line_end + 2;
        while (p < end + 2) {
            char *eol = memmem(p, (size_t)(end + 2 - p), "\r\n", 2);
            size_t ll = (size_t)(eol - p);
            char *colon = memchr(p, ':', ll);
            if (!colon) { free(out); goto broken; }
            size_t nlen = (size_t)(colon - p);
            const char *v = colon + 1, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            size_t vlen = (size_t)(ve - v);
            int forward = 1;
            if (ieq(p, nlen, "content-length")) {
                if (has_len || vlen == 0 || vlen > 15) { free(out); goto broken; }
                has_len = 1;
                for (size_t k = 0; k < vlen; k++) {
                    if (v[k] < '0' || v[k] > '9') { free(out); goto broken; }
                    clen = clen * 10 + (uint64_t)(v[k] - '0');
                }
            } else if (ieq(p, nlen, "content-type")) {
                if (vlen >= 17 && strncasecmp(v, "text/event-stream", 17) == 0) sse = 1;
            } else if (ieq(p, nlen, "transfer-encoding")) {
                forward = 0;
                if (vlen >= 7 && strncasecmp(ve - 7, "chunked", 7) == 0) chunked = 1;
                else { free(out); goto broken; }
            } else if (ieq(p, nlen, "connection")) {
                forward = 0;
                for (size_t k = 0; k + 5 <= vlen; k++)
                    if (strncasecmp(v + k, "close", 5) == 0) conn_close = 1;
                for (size_t k = 0; k + 10 <= vlen; k++)
                    if (strncasecmp(v + k, "keep-alive", 10) == 0) keep_alive_word = 1;
            } else if (ieq(p, nlen, "x-accel-buffering") || ieq(p, nlen, "keep-alive") ||
                       ieq(p, nlen, "proxy-connection") || ieq(p, nlen, "proxy-authenticate") ||
                       ieq(p, nlen, "te") || ieq(p, nlen, "trailer") || ieq(p, nlen, "upgrade")) {
                forward = 0;
            }
            if (forward) {
                memcpy(out + o, p, ll + 2);
                o += ll + 2;
            }
            p = eol + 2;
        }
        if (http10 && keep_alive_word) conn_close = 0;
        u->close_after = conn_close;
        c->status = status;
        if (status == 204 || status == 304) {
            u->framing = F_NONE;
        } else if (chunked) {
            u->framing = F_CHUNKED;
            u->ch = CH_SIZE;
            u->ch_left = 0;
            memcpy(out + o, "Transfer-Encoding: chunked\r\n", 28);
            o += 28;
        } else if (has_len) {
            u->framing = F_LENGTH;
            u->remaining = clen;
        } else {
            /* Delimited by the end of the connection: so is the client's. */
            u->framing = F_CLOSE;
            u->close_after = 1;
            c->close_after = 1;
            memcpy(out + o, "Connection: close\r\n", 19);
            o += 19;
        }
        if (sse) {
            memcpy(out + o, "X-Accel-Buffering: no\r\n", 23);
            o += 23;
        }
        memcpy(out + o, "\r\n", 2);
        o += 2;
        c->head_sent = 1;
        u->phase = UP_BODY;
        int w = conn_write(l, c, out, o);
        free(out);
        if (w < 0) { client_gone(l, c); return; }
        size_t rest = u->in_len - head_len;
        int fail = 0;
        int done = u->framing == F_NONE || (u->framing == F_LENGTH && u->remaining == 0);
        if (rest && !done) {
            done = relay_body(l, u, c, u->in + head_len, rest, &fail);
            if (done < 0) return;
        }
        u->in_len = 0;
        if (fail) goto cut;
        if (done) {
            int keep_client = !c->close_after;
            finish_exchange(l, c, status, 1);
            if (!keep_client) { shutdown(c->fd, SHUT_WR); c->close_after = 2; }
            else next_request(l, c);
        }
        return;
    }
broken:
    /* Not HTTP from llama-server, before anything reached the client: Python's path answers. */
    up_failed(l, u);
    return;
cut:
    finish_exchange(l, c, 0, 0);
    conn_close(l, c);
}

static void up_readable(lane_t *l, up_t *u) {
    conn_t *c = u->client;
    char stack[65536];
    if (!c) {
        /* Bytes or the end on an idle pooled connection: nothing may be trusted on it. */
        pthread_mutex_lock(&l->mu);
        slot_t *s = &l->slots[u->slot];
        for (up_t **pp = &s->idle; *pp; pp = &(*pp)->next)
            if (*pp == u) { *pp = u->next; s->nidle--; break; }
        pthread_mutex_unlock(&l->mu);
        up_close(l, u);
        return;
    }
    if (u->phase == UP_BODY && conn_pending(c) > OUT_HIGH) {
        ep_set(l, u->fd, u, EPOLLRDHUP, EPOLL_CTL_MOD);
        return;
    }
    ssize_t n;
    if (u->phase == UP_BODY) n = recv(u->fd, stack, sizeof stack, 0);
    else {
        if (u->in_cap - u->in_len < 16384) {
            size_t cap = u->in_cap ? u->in_cap * 2 : 32768;
            char *b = realloc(u->in, cap);
            if (!b) { up_failed(l, u); return; }
            u->in = b;
            u->in_cap = cap;
        }
        n = recv(u->fd, u->in + u->in_len, u->in_cap - u->in_len, 0);
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    u->stamp = now_ms();
    if (n <= 0) {
        if (u->phase == UP_BODY) {
            if (u->framing == F_CLOSE) {
                int status = c->status;
                finish_exchange(l, c, status, 0);
                shutdown(c->fd, SHUT_WR);
                c->close_after = 2;
                return;
            }
            /* Died in the middle of the answer: the client must see it cut short. */
            finish_exchange(l, c, 0, 0);
            conn_close(l, c);
            return;
        }
        up_failed(l, u);
        return;
    }
    if (u->phase != UP_BODY) {
        u->in_len += (size_t)n;
        up_head(l, u, c);
        return;
    }
    int fail = 0;
    int done = relay_body(l, u, c, stack, (size_t)n, &fail);
    if (done < 0) return;
    if (fail) {
        finish_exchange(l, c, 0, 0);
        conn_close(l, c);
        return;
    }
    if (done) {
        int status = c->status;
        finish_exchange(l, c, status, 1);
        if (c->close_after) { shutdown(c->fd, SHUT_WR); c->close_after = 2; }
        else next_request(l, c);
    }
}

static void up_writable(lane_t *l, up_t *u) {
    if (u->phase == UP_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) { up_failed(l, u); return; }
        u->phase = UP_SENDING;
    }
    if (up_flush(l, u) < 0) up_failed(l, u);
}

/* -- client events -------------------------------------------------------------------------- */

static int client_gone(lane_t *l, conn_t *c) {
    conn_close(l, c);
    return -1;
}

static void client_readable(lane_t *l, conn_t *c) {
    if (c->close_after == 2) {
        char junk[4096];
        ssize_t n = recv(c->fd, junk, sizeof junk, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) conn_close(l, c);
        return;
    }
    if (c->in_cap - c->in_len < 4096) {
        if (c->in_cap >= IN_MAX) {
            if (!c->busy) handoff(l, c, XL_OTHER);
            else conn_interest(l, c, 0, c->epoll_out);
            return;
        }
        size_t cap = c->in_cap ? c->in_cap * 2 : 8192;
        if (cap > IN_MAX) cap = IN_MAX;
        char *b = realloc(c->in, cap);
        if (!b) { conn_close(l, c); return; }
        c->in = b;
        c->in_cap = cap;
    }
    ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        /* A client that half-closes has gone (as in the Python proxy). */
        conn_close(l, c);
        return;
    }
    c->in_len += (size_t)n;
    c->stamp = now_ms();
    next_request(l, c);
}

static void client_writable(lane_t *l, conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) { c->out_off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        conn_close(l, c);
        return;
    }
    c->out_len = c->out_off = 0;
    c->stamp = now_ms();
    conn_interest(l, c, c->epoll_in, 0);
    if (c->up && c->up->phase == UP_BODY)
        ep_set(l, c->up->fd, c->up, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
}

/* -- the loop ------------------------------------------------------------------------------- */

static void accept_all(lane_t *l, int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = NULL;
        int over = l->max_conns > 0 &&
                   l->conns + __atomic_load_n(&l->py_conns, __ATOMIC_RELAXED) >= l->max_conns;
        if (!over) c = conn_new(l, fd);
        if (!c) {
            /* Over the bound: Python answers it (a 503); past 64 waiting for Python, closed at
             * once, so that a flood cannot exhaust descriptors (as the Python proxy does). */
            handoff_t *h = calloc(1, sizeof *h);
            pthread_mutex_lock(&l->mu);
            int full = l->queued + __atomic_load_n(&l->py_refusing, __ATOMIC_RELAXED) >= 64;
            if (h && !full) {
                h->fd = fd;
                h->reason = XL_OTHER;
                if (l->to_py_tail) l->to_py_tail->next = h; else l->to_py = h;
                l->to_py_tail = h;
                l->handed++;
                l->queued++;
            }
            pthread_mutex_unlock(&l->mu);
            if (!h || full) { free(h); close(fd); continue; }
            notify_python(l);
        }
    }
}

static void take_back(lane_t *l) {
    uint64_t v;
    ssize_t r = read(l->wake, &v, sizeof v);
    (void)r;
    pthread_mutex_lock(&l->mu);
    handoff_t *h = l->to_lane;
    l->to_lane = NULL;
    pthread_mutex_unlock(&l->mu);
    while (h) {
        handoff_t *next = h->next;
        if (l->stopping) close(h->fd);
        else {
            conn_t *c = conn_new(l, h->fd);
            if (!c) close(h->fd);
            else {
                pthread_mutex_lock(&l->mu);
                l->taken_back++;
                pthread_mutex_unlock(&l->mu);
            }
        }
        free(h);
        h = next;
    }
}

static void sweep(lane_t *l) {
    uint64_t now = now_ms();
    for (conn_t *c = l->all, *next; c; c = next) {
        next = c->next;
        if (c->busy) {
            up_t *u = c->up;
            if (u && u->phase == UP_CONNECTING && now - u->stamp > l->connect_ms) {
                up_failed(l, u); /* not taken: Python's path decides (504 or a restart) */
                continue;
            }
            if (u && now - u->stamp > l->upstream_ms) {
                finish_exchange(l, c, 0, 0);
                conn_close(l, c);
            }
            continue;
        }
        if (conn_pending(c) && now - c->stamp > l->upstream_ms) { conn_close(l, c); continue; }
        if (c->close_after == 2) {
            if (now - c->stamp > 2000) conn_close(l, c);
            continue;
        }
        if (c->in_len) {
            /* A request still arriving: Python's bounds on slow clients apply. */
            if (c->partial_since && now - c->partial_since > PARTIAL_MS) handoff(l, c, XL_OTHER);
            continue;
        }
        if (l->stopping || now - c->stamp > l->keepalive_ms) conn_close(l, c);
    }
    /* Pooled connections of a route no request may take any more. */
    for (int i = 0; i < MAX_SLOTS; i++) {
        slot_t *s = &l->slots[i];
        if (!s->used || (!s->retired && !l->stopping)) continue;
        pthread_mutex_lock(&l->mu);
        up_t *u = s->idle;
        s->idle = NULL;
        s->nidle = 0;
        pthread_mutex_unlock(&l->mu);
        while (u) { up_t *n = u->next; up_close(l, u); u = n; }
    }
}

static void *lane_main(void *arg) {
    lane_t *l = arg;
    struct epoll_event evs[256];
    uint64_t last_sweep = now_ms();
    int stopping_seen = 0;
    for (;;) {
        int n = epoll_wait(l->ep, evs, 256, 250);
        for (int i = 0; i < n; i++) {
            tag_t *t = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (t->dead) continue;
            if (t->kind == K_LISTEN) {
                for (int k = 0; k < l->nlisten; k++)
                    if (&l->listen_tag[k] == t) accept_all(l, l->listen_fd[k]);
            } else if (t->kind == K_WAKE) {
                take_back(l);
            } else if (t->kind == K_CLIENT) {
                conn_t *c = (conn_t *)t;
                if (e & EPOLLOUT) client_writable(l, c);
                if (c->tag.dead) continue;
                if (e & EPOLLIN) client_readable(l, c);
                else if (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) conn_close(l, c);
            } else if (t->kind == K_UP) {
                up_t *u = (up_t *)t;
                if ((e & EPOLLOUT) && u->phase != UP_BODY && u->phase != UP_HEAD) {
                    up_writable(l, u);
                } else if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                    up_readable(l, u);
                }
            }
        }
        int stopping;
        pthread_mutex_lock(&l->mu);
        stopping = l->stopping;
        pthread_mutex_unlock(&l->mu);
        if (stopping && !stopping_seen) {
            stopping_seen = 1;
            for (int k = 0; k < l->nlisten; k++) {
                epoll_ctl(l->ep, EPOLL_CTL_DEL, l->listen_fd[k], NULL);
                close(l->listen_fd[k]);
            }
            l->nlisten = 0;
            sweep(l);
        }
        uint64_t now = now_ms();
        if (now - last_sweep >= 1000 || (stopping && now - last_sweep >= 50)) {
            last_sweep = now;
            sweep(l);
        }
        reap(l);
        if (stopping == 2) break;
    }
    while (l->all) {
        conn_t *c = l->all;
        if (c->busy) finish_exchange(l, c, 499, 0);
        conn_close(l, c);
    }
    for (int i = 0; i < MAX_SLOTS; i++) {
        slot_t *s = &l->slots[i];
        up_t *u = s->idle;
        s->idle = NULL;
        while (u) { up_t *nx = u->next; up_close(l, u); u = nx; }
    }
    reap(l);
    return NULL;
}

/* -- the API (serve/express.py) ------------------------------------------------------------- */

int xl_version(void) { return XL_VERSION; }

int xl_take_max(void) { return IN_MAX; }

lane_t *xl_create(int notify_fd, int max_conns, int keepalive_ms, int upstream_ms,
                  int connect_ms) {
    lane_t *l = calloc(1, sizeof *l);
    if (!l) return NULL;
    pthread_mutex_init(&l->mu, NULL);
    l->notify = notify_fd;
    l->max_conns = max_conns;
    l->keepalive_ms = (uint64_t)keepalive_ms;
    l->upstream_ms = (uint64_t)upstream_ms;
    l->connect_ms = (uint64_t)connect_ms;
    l->ep = epoll_create1(EPOLL_CLOEXEC);
    l->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->ep < 0 || l->wake < 0) {
        if (l->ep >= 0) close(l->ep);
        if (l->wake >= 0) close(l->wake);
        free(l);
        return NULL;
    }
    l->wake_tag.kind = K_WAKE;
    ep_set(l, l->wake, &l->wake_tag, EPOLLIN, EPOLL_CTL_ADD);
    return l;
}

/* A listening socket (the lane owns this descriptor from now on). */
int xl_listen(lane_t *l, int fd) {
    if (l->started || l->nlisten == MAX_LISTEN) return -1;
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    l->listen_fd[l->nlisten] = fd;
    l->listen_tag[l->nlisten].kind = K_LISTEN;
    ep_set(l, fd, &l->listen_tag[l->nlisten], EPOLLIN, EPOLL_CTL_ADD);
    l->nlisten++;
    return 0;
}

int xl_key(lane_t *l, const char *key, int len) {
    if (l->started || l->nkeys == MAX_KEYS || len <= 0 || len >= KEY_MAX_LEN) return -1;
    memcpy(l->keys[l->nkeys], key, (size_t)len);
    l->keylen[l->nkeys++] = len;
    return 0;
}

/* Host header values a request may carry (any: every value). */
int xl_host(lane_t *l, const char *host, int len, int any) {
    pthread_mutex_lock(&l->mu);
    int r = 0;
    if (any) l->hosts_any = 1;
    else if (len <= 0 || len >= HOST_MAX_LEN) r = -1;
    else if (!host_ok(l, host, (size_t)len)) {
        if (l->nhosts == MAX_HOSTS) r = -1;
        else { memcpy(l->hosts[l->nhosts], host, (size_t)len); l->hostlen[l->nhosts++] = len; }
    }
    pthread_mutex_unlock(&l->mu);
    return r;
}

int xl_start(lane_t *l) {
    if (l->started) return -1;
    if (pthread_create(&l->thread, NULL, lane_main, l) != 0) return -1;
    l->started = 1;
    return 0;
}

/* An upstream (a llama-server) requests may go to: its slot, or -1 when none is free. */
int xl_upstream(lane_t *l, const char *ip, int port, const char *auth, int authlen) {
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        sl = sizeof *a4;
    } else if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        sl = sizeof *a6;
    } else {
        return -1;
    }
    if (authlen < 0 || authlen >= KEY_MAX_LEN) return -1;
    pthread_mutex_lock(&l->mu);
    int found = -1;
    for (int i = 0; i < MAX_SLOTS; i++) {
        slot_t *s = &l->slots[i];
        if (!s->used || (s->retired && !s->in_flight && !s->records && !s->conns)) {
            found = i;
            break;
        }
    }
    if (found >= 0) {
        slot_t *s = &l->slots[found];
        int gen = s->gen + 1;
        memset(s, 0, sizeof *s);
        s->gen = gen;
        s->used = 1;
        s->addr = ss;
        s->addrlen = sl;
        if (authlen) {
            s->authlen = snprintf(s->auth, sizeof s->auth, "Authorization: %.*s\r\n", authlen, auth);
        }
    }
    pthread_mutex_unlock(&l->mu);
    return found;
}

/* The slot's generation while requests may still be routed to it, else -1 (retired). */
int xl_slot_gen(lane_t *l, int slot) {
    if (slot < 0 || slot >= MAX_SLOTS) return -1;
    pthread_mutex_lock(&l->mu);
    slot_t *s = &l->slots[slot];
    int gen = s->used && !s->retired ? s->gen : -1;
    pthread_mutex_unlock(&l->mu);
    return gen;
}

/* Requests naming `name` (len -1: naming no model) go to `slot`. */
int xl_name(lane_t *l, const char *name, int len, int slot) {
    if (slot < 0 || slot >= MAX_SLOTS || len >= NAME_MAX_LEN) return -1;
    pthread_mutex_lock(&l->mu);
    int r = 0;
    if (!l->slots[slot].used || l->slots[slot].retired) {
        r = -1;
    } else {
        name_t *n = NULL;
        for (int i = 0; i < l->nnames && !n; i++)
            if (l->names[i].len == len && (len <= 0 || memcmp(l->names[i].s, name, (size_t)len) == 0))
                n = &l->names[i];
        if (!n && l->nnames < MAX_NAMES) {
            n = &l->names[l->nnames++];
            n->len = len;
            if (len > 0) memcpy(n->s, name, (size_t)len);
        }
        if (n) n->slot = slot; /* the newest route for a name wins */
        else r = -1;
    }
    pthread_mutex_unlock(&l->mu);
    return r;
}

/* Forget every route: requests go to Python until it routes them again. */
void xl_clear(lane_t *l) {
    pthread_mutex_lock(&l->mu);
    l->nnames = 0;
    for (int i = 0; i < MAX_SLOTS; i++)
        if (l->slots[i].used) l->slots[i].retired = 1;
    pthread_mutex_unlock(&l->mu);
}

/* Finished exchanges since the last call, as (slot, status, microseconds) triples. */
int xl_drain(lane_t *l, uint32_t *out, int cap) {
    pthread_mutex_lock(&l->mu);
    int n = 0;
    while (l->jlen && n < cap) {
        uint32_t *r = l->journal[l->jhead];
        out[3 * n] = r[0];
        out[3 * n + 1] = r[1];
        out[3 * n + 2] = r[2];
        l->slots[r[0]].records--;
        l->jhead = (l->jhead + 1) % JOURNAL;
        l->jlen--;
        n++;
    }
    pthread_mutex_unlock(&l->mu);
    return n;
}

/* How many client connections the Python proxy holds (they count in the bound too), and how
 * many it is turning away (with those waiting in the queue, at most 64 at once). */
void xl_python_conns(lane_t *l, int n, int refusing) {
    __atomic_store_n(&l->py_conns, n, __ATOMIC_RELAXED);
    __atomic_store_n(&l->py_refusing, refusing, __ATOMIC_RELAXED);
}

int xl_in_flight(lane_t *l, int slot) {
    if (slot < 0 || slot >= MAX_SLOTS) return 0;
    pthread_mutex_lock(&l->mu);
    int n = l->slots[slot].in_flight;
    pthread_mutex_unlock(&l->mu);
    return n;
}

/* requests, in flight, connections, handed to Python, taken back, journal records lost */
void xl_stats(lane_t *l, int64_t *out) {
    pthread_mutex_lock(&l->mu);
    out[0] = (int64_t)l->requests;
    out[1] = l->in_flight;
    out[2] = l->conns;
    out[3] = (int64_t)l->handed;
    out[4] = (int64_t)l->taken_back;
    out[5] = (int64_t)l->jlost;
    pthread_mutex_unlock(&l->mu);
}

/* The next connection for Python: its descriptor, why, and the bytes read from it (at most
 * xl_take_max()); -1 when none waits. */
long xl_take(lane_t *l, int *fd, int *reason, char *buf, long cap) {
    pthread_mutex_lock(&l->mu);
    handoff_t *h = l->to_py;
    if (h) {
        l->to_py = h->next;
        if (!l->to_py) l->to_py_tail = NULL;
        l->queued--;
    }
    pthread_mutex_unlock(&l->mu);
    if (!h) return -1;
    *fd = h->fd;
    *reason = h->reason;
    long n = (long)h->len;
    if (n > cap) n = cap; /* cannot happen: the lane never holds more than xl_take_max() */
    if (n) memcpy(buf, h->data, (size_t)n);
    free(h->data);
    free(h);
    return n;
}

/* A connection back from Python, idle between requests (the lane owns the descriptor). */
int xl_give(lane_t *l, int fd) {
    handoff_t *h = calloc(1, sizeof *h);
    if (!h) return -1;
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    h->fd = fd;
    pthread_mutex_lock(&l->mu);
    int stopping = l->stopping;
    if (!stopping) { h->next = l->to_lane; l->to_lane = h; }
    pthread_mutex_unlock(&l->mu);
    if (stopping) { free(h); return -1; }
    uint64_t one = 1;
    ssize_t r = write(l->wake, &one, sizeof one);
    (void)r;
    return 0;
}

/* Stop accepting; idle connections close, exchanges under way finish (xl_stats: in flight). */
void xl_stop(lane_t *l) {
    pthread_mutex_lock(&l->mu);
    if (!l->stopping) l->stopping = 1;
    pthread_mutex_unlock(&l->mu);
    uint64_t one = 1;
    ssize_t r = write(l->wake, &one, sizeof one);
    (void)r;
}

/* End the thread, close everything the lane still holds, free it. */
void xl_destroy(lane_t *l) {
    if (l->started) {
        pthread_mutex_lock(&l->mu);
        l->stopping = 2;
        pthread_mutex_unlock(&l->mu);
        uint64_t one = 1;
        ssize_t r = write(l->wake, &one, sizeof one);
        (void)r;
        pthread_join(l->thread, NULL);
    } else {
        for (int k = 0; k < l->nlisten; k++) close(l->listen_fd[k]);
    }
    handoff_t *h = l->to_py;
    while (h) { handoff_t *n = h->next; close(h->fd); free(h->data); free(h); h = n; }
    h = l->to_lane;
    while (h) { handoff_t *n = h->next; close(h->fd); free(h); h = n; }
    close(l->ep);
    close(l->wake);
    pthread_mutex_destroy(&l->mu);
    free(l);
}
