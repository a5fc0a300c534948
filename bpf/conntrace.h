/* conntrace.h: what the BPF programs hand to user space.
 *
 * Shared by bpf/conntrace.bpf.c (compiled by BCC against the running kernel's
 * headers) and conntrace/decode.py, which mirrors every struct with ctypes and
 * checks CT_EVENT_SIZE / CT_AGG_KEY_SIZE against sizeof() at load.  The #define
 * lines below are also parsed by decode.py: keep them one per line, decimal or hex.
 *
 * Layout rules: fixed-size fields only, naturally aligned, explicit padding, no
 * kernel types (the record must mean the same on 5.10 and 7.2).  Multi-byte
 * fields copied raw from packets or tuples stay in network byte order.
 */
#ifndef CONNTRACE_H
#define CONNTRACE_H

/* Which attach rung the program was compiled for (-DCT_RUNG=...). */
#define CT_RUNG_PRE61 1         /* <= 6.0: "%s" reason strings, no numbers */
#define CT_RUNG_VARIADIC 2      /* 6.1 .. pre-defer: nf_tcp_log_invalid(..., fmt, ...) */
#define CT_RUNG_DEFERRED 3      /* 6.1.184+, 6.12.104+, 7.2: nf_tcp_log_invalid(..., log) */

/* Which probe produced an event (ct_event.source). */
#define CT_SRC_TCP_LOG_VARIADIC 1   /* kprobe nf_tcp_log_invalid, variadic */
#define CT_SRC_TCP_LOG_DEFERRED 2   /* kprobe nf_tcp_log_invalid, struct nf_tcp_invalid_log */
#define CT_SRC_CT_LOG 3             /* kprobe nf_ct_l4proto_log_invalid */
#define CT_SRC_L4_LOG 4             /* kprobe nf_l4proto_log_invalid (tcp_error) */

/* Stable reason codes; names match conntrace.events.REASONS. 1..6 are window reasons. */
#define CT_R_UNKNOWN 0
#define CT_R_SEQ_OVER 1
#define CT_R_ACK_OVER 2
#define CT_R_SACK_OVER 3
#define CT_R_SEQ_UNDER 4
#define CT_R_ACK_UNDER 5
#define CT_R_OVERSHOT 6
#define CT_R_INVALID_RST 7
#define CT_R_INVALID_STATE 8
#define CT_R_IGNORED_STATE 9
#define CT_R_CHALLENGE_ACK 10
#define CT_R_LOWER_TIMEOUT 11
#define CT_R_BAD_CHECKSUM 12
#define CT_R_TRUNCATED 13
#define CT_R_SHORT_PACKET 14
#define CT_R_BAD_FLAGS 15
#define CT_R_INVALID_NEW 16
#define CT_R_LAST_WINDOW 6

/* Verdicts; names match conntrace.events.VERDICTS. */
#define CT_V_INVALID 0
#define CT_V_IGNORED 1
#define CT_V_LIBERAL 2          /* "accepted-liberal": would be INVALID/IGNORED, be_liberal accepted it */
#define CT_V_INFO 3

/* ct_event.flags */
#define CT_F_HAVE_CT 0x01       /* tcp, tuples and status were read from a struct nf_conn */
#define CT_F_HAVE_VALUE 0x02    /* value holds the kernel's own number (%u or log->value) */
#define CT_F_LIBERAL_SENDER 0x04 /* sender's seen[dir].flags had IP_CT_TCP_FLAG_BE_LIBERAL */
#define CT_F_LIBERAL_SYSCTL 0x08 /* nf_conntrack_tcp_be_liberal was set in the packet's netns */
#define CT_F_HAVE_PKT 0x10      /* iph holds the network header */
#define CT_F_HAVE_TCPH 0x20     /* tcph holds tcph_len bytes of the TCP header */
#define CT_F_VIA_PV 0x40        /* fmt came through "%pV" (struct va_format); args from its va_list */
#define CT_F_HAVE_KNOBS 0x80    /* knob_* were read from the netns */

#define CT_DIR_UNKNOWN 255
#define CT_FMT_LEN 64
#define CT_STR_LEN 64
#define CT_KEY_LEN 32           /* fmt_table key: first 31 bytes of the text, zero padded */
#define CT_IPH_LEN 40
#define CT_TCPH_LEN 60
#define CT_EVENT_SIZE 456
#define CT_AGG_KEY_SIZE 44

/* Mirror of struct ip_ct_tcp_state / struct ip_ct_tcp (same layout 4.19 .. 7.2;
 * the C side asserts it against the kernel headers at compile time). */
struct ct_tcp_state {
	__u32 td_end;
	__u32 td_maxend;
	__u32 td_maxwin;
	__u32 td_maxack;
	__u8 td_scale;
	__u8 flags;
	__u8 pad[2];
};

struct ct_tcp {
	struct ct_tcp_state seen[2];    /* [IP_CT_DIR_ORIGINAL], [IP_CT_DIR_REPLY] */
	__u8 state;
	__u8 last_dir;
	__u8 retrans;
	__u8 last_index;
	__u32 last_seq;
	__u32 last_ack;
	__u32 last_end;
	__u16 last_win;
	__u8 last_wscale;
	__u8 last_flags;
};

/* Mirror of struct nf_conntrack_tuple (40 bytes, copied raw). */
struct ct_tuple {
	__u8 src[16];
	__u16 sport;            /* network order */
	__u16 l3num;            /* AF_INET 2, AF_INET6 10 */
	__u8 dst[16];
	__u16 dport;            /* network order */
	__u8 protonum;
	__u8 dir;
};

struct ct_event {
	__u64 ts_ns;            /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 ct_status;        /* ct->status (IPS_* bits) */
	__u64 args[4];          /* the format's arguments, raw 64-bit slots */
	__u32 netns;            /* net->ns.inum */
	__u32 value;            /* kernel's number, if CT_F_HAVE_VALUE */
	__u32 skb_len;
	__u32 skb_data_len;
	__u16 data_off;         /* skb->data - skb->head */
	__u16 nh_off;           /* skb->network_header */
	__u16 th_off;           /* TCP header offset from skb->head that we read */
	__u8 source;            /* CT_SRC_* */
	__u8 reason;            /* CT_R_*, classified in the kernel (aggregation uses it) */
	__u8 verdict;           /* CT_V_* */
	__u8 ret;               /* variadic nf_tcp_log_invalid: 0 IGNORE, 1 INVALID */
	__u8 dir;               /* 0 original, 1 reply, CT_DIR_UNKNOWN */
	__u8 ctinfo;            /* skb->_nfct & 7 */
	__u8 flags;             /* CT_F_* */
	__u8 tcph_len;
	__u8 knob_be_liberal;
	__u8 knob_loose;
	__u8 knob_ignore_invalid_rst;   /* 255: the kernel has no such knob */
	__u8 knob_log_invalid;
	__u8 knob_checksum;
	__u8 log_type;          /* deferred: enum nf_tcp_invalid_log_type */
	struct ct_tcp tcp;      /* ct->proto.tcp at probe time */
	struct ct_tuple orig;
	struct ct_tuple reply;
	__u8 iph[CT_IPH_LEN];
	__u8 tcph[CT_TCPH_LEN];
	char fmt[CT_FMT_LEN];   /* the kernel's format string (inner one for "%pV") */
	char str[CT_STR_LEN];   /* the format's one string argument, if any */
	__u8 pad[4];
};

/* fmt_table: filled by user space from decode.KERNEL_STRINGS, read by the probes
 * so that aggregation can classify without user-space work per packet. */
struct ct_fmt_key {
	char text[CT_KEY_LEN];
};

struct ct_fmt_info {
	__u8 reason;
	__u8 verdict;
	__u8 str_arg;           /* index of the %s argument, 255 if none */
	__u8 pad;
};

/* Per-netns knobs as last seen by a probe. */
struct ct_knobs {
	__u8 be_liberal;
	__u8 loose;
	__u8 ignore_invalid_rst;
	__u8 log_invalid;
	__u8 checksum;
	__u8 pad[3];
};

/* In-kernel aggregation (top): one row per (netns, sender, receiver, local port, reason, verdict). */
struct ct_agg_key {
	__u32 netns;
	__u8 family;            /* 4 or 6 (0: packet unreadable) */
	__u8 reason;
	__u8 verdict;
	__u8 pad;
	__u8 peer[16];          /* sender of the rejected segment */
	__u8 local[16];         /* its destination */
	__u16 lport;            /* destination port, network order */
	__u16 pad2;
};

struct ct_agg_val {
	__u64 packets;
	__u64 bytes;            /* skb->len (L3) */
	__u64 first_ns;
	__u64 last_ns;
};

#endif /* CONNTRACE_H */
