/* conntrace.bpf.c: why conntrack's TCP tracker rejected or ignored a segment.
 *
 * Loaded by conntrace/probe.py with BCC, compiled once per run against the running
 * kernel's headers.  One source serves every kernel: probe.py picks the rung from
 * /proc/kallsyms and BTF (never from the version string) and passes it as -D flags.
 *
 * The rungs (reference: shared/reference/conntrack-tcp-invalid.md, sections 1, 5, 7):
 *
 *  CT_RUNG_DEFERRED  6.1.184+, 6.12.104+, 7.2
 *      kprobe nf_tcp_log_invalid(skb, ct, state, const struct nf_tcp_invalid_log *log)
 *      log->type names the failed window check, log->value is the kernel's bound.
 *      It runs after ct->lock is dropped, so ct->proto.tcp may already have moved:
 *      log->value stays authoritative.  be_liberal packets never get here.
 *
 *  CT_RUNG_VARIADIC  6.1.0 .. 6.1.183, 6.2 .. 7.1, 6.12.0 .. 6.12.103
 *      kprobe nf_tcp_log_invalid(skb, ct, state, sender, ret, fmt, value)
 *      rcx = sender, r8 = ret (IGNORE 0 / INVALID 1), r9 = fmt, first stack slot = value.
 *      The kernel calls it for every failed window check *before* testing be_liberal,
 *      so we also see packets that be_liberal accepts ("accepted-liberal").
 *
 *  CT_RUNG_PRE61     <= 6.0
 *      Window reasons arrive at nf_ct_l4proto_log_invalid as ("%s", reason) with no
 *      numbers.  ct is locked and unmodified there, so user space recomputes the
 *      bound from the ct->proto.tcp we copy.
 *
 *  Every rung also probes
 *      nf_ct_l4proto_log_invalid  state machine: invalid rst, packet invalid/ignored
 *                                 in state, challenge ack, lowered timeout;
 *      nf_l4proto_log_invalid     tcp_error: truncated, bad checksum, bad flags,
 *                                 invalid new (protonum 6 only).
 *  Both helpers run before the nf_conntrack_log_invalid sysctl test, so the probes
 *  fire whether or not the kernel prints anything.
 *
 * No double counting:
 *  - nf_ct_l4proto_log_invalid calls nf_l4proto_log_invalid(..., "%pV", &vaf) to print:
 *    the nf_l4proto_log_invalid probe drops every "%pV" call.
 *  - the variadic nf_tcp_log_invalid prints through nf_ct_l4proto_log_invalid(..., "%pV"):
 *    that probe follows "%pV" to the inner format, and on the 6.1+ rungs drops window
 *    reasons there, because nf_tcp_log_invalid already reported them.
 *
 * Helper signatures changed in 5.14 ("pass hook state to log functions"):
 *  CT_HELPER_STATE=1: nf_ct_l4proto_log_invalid(skb, ct, state, fmt, ...)
 *                     nf_l4proto_log_invalid(skb, state, protonum, fmt, ...)
 *  CT_HELPER_STATE=0: nf_ct_l4proto_log_invalid(skb, ct, fmt, ...)
 *                     nf_l4proto_log_invalid(skb, net, pf, protonum, fmt, ...)
 *
 * Only invalid-path functions are probed, so valid traffic pays nothing.
 * The stack-slot reads are x86-64 specific (System V ABI: 6 register arguments).
 */
#include <uapi/linux/ptrace.h>
#include <linux/skbuff.h>
#include <linux/netdevice.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>
#include "conntrace.h"

#ifndef CT_RUNG
#error "CT_RUNG must be set by probe.py (-DCT_RUNG=1|2|3)"
#endif
#ifndef CT_HELPER_STATE
#define CT_HELPER_STATE 1
#endif
#ifndef CT_HAVE_IGNORE_INVALID_RST
#define CT_HAVE_IGNORE_INVALID_RST 0
#endif
#ifndef CT_EVENTS
#define CT_EVENTS 1
#endif
#ifndef CT_AGG
#define CT_AGG 0
#endif
#ifndef CT_AGG_ENTRIES
#define CT_AGG_ENTRIES 16384
#endif
#ifndef CT_RINGBUF_PAGES
#define CT_RINGBUF_PAGES 256
#endif
#ifndef CT_FILTER_NETNS
#define CT_FILTER_NETNS 0       /* 0: every netns */
#endif
#ifndef CT_FILTER_PORT
#define CT_FILTER_PORT 0        /* 0: every port; else source or destination port */
#endif

/* Our mirrors must match the kernel's layout; if not, refuse to build. */
_Static_assert(sizeof(struct ct_tcp) == sizeof(struct ip_ct_tcp), "struct ip_ct_tcp changed");
_Static_assert(sizeof(struct ct_tuple) == sizeof(struct nf_conntrack_tuple), "tuple changed");
_Static_assert(sizeof(struct ct_event) == CT_EVENT_SIZE, "CT_EVENT_SIZE");
_Static_assert(sizeof(struct ct_agg_key) == CT_AGG_KEY_SIZE, "CT_AGG_KEY_SIZE");

#if CT_EVENTS
BPF_RINGBUF_OUTPUT(events, CT_RINGBUF_PAGES);
#endif
BPF_PERCPU_ARRAY(scratch, struct ct_event, 1);  /* too big for the 512-byte stack */
BPF_PERCPU_ARRAY(lost, u64, 1);                  /* ringbuf full: events user space never saw */
BPF_HASH(fmt_table, struct ct_fmt_key, struct ct_fmt_info, 128);
BPF_HASH(netns_knobs, u32, struct ct_knobs, 1024);
#if CT_AGG
BPF_TABLE("lru_hash", struct ct_agg_key, struct ct_agg_val, aggs, CT_AGG_ENTRIES);
/* [0] keys inserted, [1] inserts that failed.  LRU evictions = inserted - entries
 * present (user space never deletes), so overflow is counted, not guessed. */
BPF_ARRAY(agg_stats, u64, 2);
#endif

/* deferred kernels: struct nf_tcp_invalid_log lives in nf_conntrack_proto_tcp.c, not
 * in a header, so mirror it (enum nf_tcp_invalid_log_type type; u32 value). */
struct ct_invalid_log {
	u32 type;
	u32 value;
};

/* x86-64 struct va_format { const char *fmt; va_list *va; } and the va_list tag. */
struct ct_va_format {
	u64 fmt;
	u64 va;
};

struct ct_va_tag {
	u32 gp_offset;          /* bytes of the 48-byte register save area already used */
	u32 fp_offset;
	u64 overflow_arg_area;  /* stack arguments */
	u64 reg_save_area;
};

/* Stack argument k of the probed function: at entry sp points at the return address. */
static __always_inline u64 stack_arg(struct pt_regs *ctx, int k)
{
	u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), (void *)(PT_REGS_SP(ctx) + 8 + 8 * k));
	return v;
}

static __always_inline struct ct_event *new_event(u8 source)
{
	u32 zero = 0;
	struct ct_event *e = scratch.lookup(&zero);

	if (!e)
		return NULL;
	__builtin_memset(e, 0, sizeof(*e));   /* read_str leaves bytes after the NUL alone */
	e->source = source;
	e->dir = CT_DIR_UNKNOWN;
	e->th_off = 0xffff;
	return e;
}

static __always_inline int is_fmt(const char *s, char a, char b, char c)
{
	return s[0] == '%' && s[1] == a && s[2] == b && (b == 0 || s[3] == c);
}

/* Look the text (format or "%s" argument) up in fmt_table; set reason/verdict and
 * read the %s argument the entry names. */
static __always_inline void classify(struct ct_event *e)
{
	struct ct_fmt_key key = {};
	const char *text = e->fmt;

	if (is_fmt(e->fmt, 's', 0, 0)) {
		/* ("%s", reason): the reason text is the key */
		bpf_probe_read_kernel_str(e->str, sizeof(e->str), (void *)e->args[0]);
		text = e->str;
	}
	__builtin_memcpy(key.text, text, CT_KEY_LEN - 1);

	struct ct_fmt_info *info = fmt_table.lookup(&key);
	if (!info) {
		e->reason = CT_R_UNKNOWN;
		e->verdict = CT_V_INVALID;
		return;
	}
	e->reason = info->reason;
	e->verdict = info->verdict;
	if (text == e->fmt && info->str_arg < 4) {
		u64 p = 0;
		u8 i = info->str_arg;
		if (i == 0) p = e->args[0];
		else if (i == 1) p = e->args[1];
		else if (i == 2) p = e->args[2];
		else p = e->args[3];
		bpf_probe_read_kernel_str(e->str, sizeof(e->str), (void *)p);
	}
}

/* "%pV": the real format and arguments sit behind a struct va_format. */
static __always_inline void follow_pv(struct ct_event *e, u64 vafp)
{
	struct ct_va_format vaf = {};
	struct ct_va_tag va = {};

	if (bpf_probe_read_kernel(&vaf, sizeof(vaf), (void *)vafp))
		return;
	__builtin_memset(e->fmt, 0, sizeof(e->fmt));
	bpf_probe_read_kernel_str(e->fmt, sizeof(e->fmt), (void *)vaf.fmt);
	e->flags |= CT_F_VIA_PV;
	if (bpf_probe_read_kernel(&va, sizeof(va), (void *)vaf.va))
		return;
	/* the first n_reg arguments are in the register save area, the rest on the stack */
	u32 n_reg = va.gp_offset < 48 ? (48 - va.gp_offset) / 8 : 0;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		u64 src = i < n_reg ? va.reg_save_area + va.gp_offset + 8 * i
				    : va.overflow_arg_area + 8 * (i - n_reg);
		bpf_probe_read_kernel(&e->args[i], sizeof(u64), (void *)src);
	}
}

/* Copy a small integer sysctl whatever its width in this kernel (int on 5.10, u8 on 6.1). */
#define READ_KNOB(dst, field)                                             \
	do {                                                              \
		u64 _v = 0;                                               \
		bpf_probe_read_kernel(&_v, sizeof(field), &(field));      \
		(dst) = _v > 254 ? 254 : _v;                              \
	} while (0)

static __always_inline void read_netns(struct ct_event *e, struct net *net)
{
	struct ct_knobs k = {};

	bpf_probe_read_kernel(&e->netns, sizeof(e->netns), &net->ns.inum);
	READ_KNOB(k.be_liberal, net->ct.nf_ct_proto.tcp.tcp_be_liberal);
	READ_KNOB(k.loose, net->ct.nf_ct_proto.tcp.tcp_loose);
#if CT_HAVE_IGNORE_INVALID_RST
	READ_KNOB(k.ignore_invalid_rst, net->ct.nf_ct_proto.tcp.tcp_ignore_invalid_rst);
#else
	k.ignore_invalid_rst = 255;
#endif
	READ_KNOB(k.log_invalid, net->ct.sysctl_log_invalid);
	READ_KNOB(k.checksum, net->ct.sysctl_checksum);
	e->knob_be_liberal = k.be_liberal;
	e->knob_loose = k.loose;
	e->knob_ignore_invalid_rst = k.ignore_invalid_rst;
	e->knob_log_invalid = k.log_invalid;
	e->knob_checksum = k.checksum;
	e->flags |= CT_F_HAVE_KNOBS;
	if (k.be_liberal)
		e->flags |= CT_F_LIBERAL_SYSCTL;
	/* under a flood, only write when something changed (avoids bucket-lock traffic) */
	struct ct_knobs *seen = netns_knobs.lookup(&e->netns);
	if (!seen || seen->be_liberal != k.be_liberal || seen->loose != k.loose ||
	    seen->ignore_invalid_rst != k.ignore_invalid_rst || seen->log_invalid != k.log_invalid ||
	    seen->checksum != k.checksum)
		netns_knobs.update(&e->netns, &k);
}

/* IPv6 extension headers conntrack skips before TCP (hop-by-hop, routing, dest opts). */
#define SKIP_V6_EXT(head, thoff, nexthdr)                                         \
	if (nexthdr == 0 || nexthdr == 43 || nexthdr == 60) {                     \
		u8 _h[2] = {};                                                    \
		bpf_probe_read_kernel(_h, sizeof(_h), (head) + (thoff));          \
		nexthdr = _h[0];                                                  \
		thoff += (_h[1] + 1) * 8;                                         \
	}

/* The packet: network header at head + network_header; the log helpers get no
 * dataoff, so the TCP header offset is computed from the IP header. */
static __always_inline void read_packet(struct ct_event *e, struct sk_buff *skb)
{
	unsigned char *head = NULL, *data = NULL;
	u16 nh = 0;

	bpf_probe_read_kernel(&head, sizeof(head), &skb->head);
	bpf_probe_read_kernel(&data, sizeof(data), &skb->data);
	bpf_probe_read_kernel(&nh, sizeof(nh), &skb->network_header);
	bpf_probe_read_kernel(&e->skb_len, sizeof(e->skb_len), &skb->len);
	bpf_probe_read_kernel(&e->skb_data_len, sizeof(e->skb_data_len), &skb->data_len);
	e->data_off = data - head;
	e->nh_off = nh;
	if (!head || bpf_probe_read_kernel(e->iph, sizeof(e->iph), head + nh))
		return;
	e->flags |= CT_F_HAVE_PKT;

	u32 thoff;
	u8 version = e->iph[0] >> 4;
	if (version == 4) {
		thoff = nh + (e->iph[0] & 0x0f) * 4;
	} else if (version == 6) {
		u8 nexthdr = e->iph[6];
		thoff = nh + 40;
		SKIP_V6_EXT(head, thoff, nexthdr);
		SKIP_V6_EXT(head, thoff, nexthdr);
		SKIP_V6_EXT(head, thoff, nexthdr);
	} else {
		return;
	}
	e->th_off = thoff;
	/* 60 bytes covers any options; near the end of the buffer fall back to 20 */
	if (bpf_probe_read_kernel(e->tcph, CT_TCPH_LEN, head + thoff) == 0)
		e->tcph_len = CT_TCPH_LEN;
	else if (bpf_probe_read_kernel(e->tcph, 20, head + thoff) == 0)
		e->tcph_len = 20;
	if (e->tcph_len)
		e->flags |= CT_F_HAVE_TCPH;
}

/* Everything but the reason: ct state, tuples, netns, knobs, packet. ct may be NULL
 * (tcp_error): then skb->_nfct still names the conntrack (set before the L4 handler). */
static __always_inline void fill_common(struct ct_event *e, struct sk_buff *skb,
					struct nf_conn *ct, struct net *net)
{
	unsigned long nfct = 0;

	e->ts_ns = bpf_ktime_get_ns();
	bpf_probe_read_kernel(&nfct, sizeof(nfct), &skb->_nfct);
	if (nfct) {
		e->ctinfo = nfct & NFCT_INFOMASK;
		e->dir = e->ctinfo >= IP_CT_IS_REPLY ? 1 : 0;
		if (!ct)
			ct = (struct nf_conn *)(nfct & NFCT_PTRMASK);
	}
	if (ct) {
		e->flags |= CT_F_HAVE_CT;
		bpf_probe_read_kernel(&e->ct_status, sizeof(ct->status), &ct->status);
		bpf_probe_read_kernel(&e->tcp, sizeof(e->tcp), &ct->proto.tcp);
		bpf_probe_read_kernel(&e->orig, sizeof(e->orig), &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple);
		bpf_probe_read_kernel(&e->reply, sizeof(e->reply), &ct->tuplehash[IP_CT_DIR_REPLY].tuple);
		if (!net)
			bpf_probe_read_kernel(&net, sizeof(net), &ct->ct_net.net);
	}
	if (!net) {
		struct net_device *dev = NULL;
		bpf_probe_read_kernel(&dev, sizeof(dev), &skb->dev);
		if (dev)
			bpf_probe_read_kernel(&net, sizeof(net), &dev->nd_net.net);
	}
	if (net)
		read_netns(e, net);
	read_packet(e, skb);
}

static __always_inline u32 be32_at(const u8 *p)
{
	return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

/* ACK over the bound while the ACK number itself is in range: the SACK edge was
 * the culprit (tcp_sack() takes the highest right edge). Signed 32-bit compare. */
static __always_inline void refine_ack_over(struct ct_event *e)
{
	u32 limit;

	if (e->reason != CT_R_ACK_OVER || !(e->flags & CT_F_HAVE_TCPH))
		return;
	if (!(e->tcph[13] & 0x10))        /* no ACK flag: conntrack used td_end */
		return;
	if (e->flags & CT_F_HAVE_VALUE)
		limit = e->value - 1;      /* value = receiver.td_end + 1 */
	else if ((e->flags & CT_F_HAVE_CT) && e->dir == 0)
		limit = e->tcp.seen[1].td_end;
	else if ((e->flags & CT_F_HAVE_CT) && e->dir == 1)
		limit = e->tcp.seen[0].td_end;
	else
		return;
	if ((s32)(be32_at(&e->tcph[8]) - limit) <= 0)
		e->reason = CT_R_SACK_OVER;
}

static __always_inline int filtered_out(struct ct_event *e)
{
#if CT_FILTER_NETNS
	if (e->netns != CT_FILTER_NETNS)
		return 1;
#endif
#if CT_FILTER_PORT
	if (!(e->flags & CT_F_HAVE_TCPH))
		return 1;
	u16 sport = ((u16)e->tcph[0] << 8) | e->tcph[1];
	u16 dport = ((u16)e->tcph[2] << 8) | e->tcph[3];
	if (sport != CT_FILTER_PORT && dport != CT_FILTER_PORT)
		return 1;
#endif
	return 0;
}

#if CT_AGG
static __always_inline void aggregate(struct ct_event *e)
{
	struct ct_agg_key k = {};
	struct ct_agg_val *v;
	u32 idx;

	k.netns = e->netns;
	k.reason = e->reason;
	k.verdict = e->verdict;
	if (e->flags & CT_F_HAVE_PKT) {
		u8 version = e->iph[0] >> 4;
		if (version == 4) {
			k.family = 4;
			__builtin_memcpy(k.peer, &e->iph[12], 4);
			__builtin_memcpy(k.local, &e->iph[16], 4);
		} else if (version == 6) {
			k.family = 6;
			__builtin_memcpy(k.peer, &e->iph[8], 16);
			__builtin_memcpy(k.local, &e->iph[24], 16);
		}
	}
	if (e->flags & CT_F_HAVE_TCPH)
		__builtin_memcpy(&k.lport, &e->tcph[2], 2);

	v = aggs.lookup(&k);
	if (!v) {
		struct ct_agg_val init = {};
		init.first_ns = e->ts_ns;
		int err = aggs.insert(&k, &init);
		if (err == 0) {
			idx = 0;
			u64 *n = agg_stats.lookup(&idx);
			if (n)
				__sync_fetch_and_add(n, 1);
		}
		v = aggs.lookup(&k);       /* ours, or another CPU's (-EEXIST) */
		if (!v) {
			idx = 1;
			u64 *n = agg_stats.lookup(&idx);
			if (n)
				__sync_fetch_and_add(n, 1);
			return;
		}
	}
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, e->skb_len);
	v->last_ns = e->ts_ns;
}
#endif

static __always_inline int submit(struct ct_event *e)
{
	refine_ack_over(e);
	if (filtered_out(e))
		return 0;
#if CT_AGG
	aggregate(e);
#endif
#if CT_EVENTS
	if (events.ringbuf_output(e, sizeof(*e), 0) < 0) {
		u32 zero = 0;
		u64 *n = lost.lookup(&zero);
		if (n)
			*n += 1;               /* per-CPU: no atomics needed */
	}
#endif
	return 0;
}

/* ---- window reasons on 6.1+ ------------------------------------------------ */

#if CT_RUNG == CT_RUNG_DEFERRED
static __always_inline u8 deferred_reason(u32 type)
{
	switch (type) {
	case 1: return CT_R_OVERSHOT;
	case 2: return CT_R_SEQ_OVER;
	case 3: return CT_R_ACK_OVER;
	case 4: return CT_R_SEQ_UNDER;
	case 5: return CT_R_ACK_UNDER;
	}
	return CT_R_UNKNOWN;
}

/* nf_tcp_log_invalid(skb, ct, state, log) */
int on_tcp_log_invalid(struct pt_regs *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)PT_REGS_PARM1(ctx);
	struct nf_conn *ct = (struct nf_conn *)PT_REGS_PARM2(ctx);
	struct ct_invalid_log log = {};
	struct ct_event *e = new_event(CT_SRC_TCP_LOG_DEFERRED);

	if (!e)
		return 0;
	bpf_probe_read_kernel(&log, sizeof(log), (void *)PT_REGS_PARM4(ctx));
	e->log_type = log.type;
	e->value = log.value;
	e->args[0] = log.value;
	e->flags |= CT_F_HAVE_VALUE;
	e->reason = deferred_reason(log.type);
	/* SEQ over and ACK over are INVALID; overshot and the two "under" are IGNOREd */
	e->verdict = (log.type == 2 || log.type == 3) ? CT_V_INVALID : CT_V_IGNORED;
	fill_common(e, skb, ct, NULL);
	return submit(e);
}
#endif

#if CT_RUNG == CT_RUNG_VARIADIC
/* nf_tcp_log_invalid(skb, ct, state, sender, ret, fmt, value) */
int on_tcp_log_invalid(struct pt_regs *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)PT_REGS_PARM1(ctx);
	struct nf_conn *ct = (struct nf_conn *)PT_REGS_PARM2(ctx);
	u64 sender = PT_REGS_PARM4(ctx);
	struct ct_event *e = new_event(CT_SRC_TCP_LOG_VARIADIC);
	u8 sender_flags = 0;

	if (!e)
		return 0;
	e->ret = PT_REGS_PARM5(ctx);
	bpf_probe_read_kernel_str(e->fmt, sizeof(e->fmt), (void *)PT_REGS_PARM6(ctx));
	e->args[0] = stack_arg(ctx, 0);
	e->value = (u32)e->args[0];        /* a u32 vararg: the slot's upper half is junk */
	e->flags |= CT_F_HAVE_VALUE;
	classify(e);
	fill_common(e, skb, ct, NULL);

	/* sender == &ct->proto.tcp.seen[dir] */
	u64 seen0 = (u64)ct + __builtin_offsetof(struct nf_conn, proto.tcp.seen);
	e->dir = (sender - seen0) / sizeof(struct ip_ct_tcp_state) ? 1 : 0;
	bpf_probe_read_kernel(&sender_flags, 1,
			      (void *)(sender + __builtin_offsetof(struct ip_ct_tcp_state, flags)));
	if (sender_flags & IP_CT_TCP_FLAG_BE_LIBERAL)
		e->flags |= CT_F_LIBERAL_SENDER;

	/* the kernel tests liberal first and accepts; else ret decides */
	if (e->flags & (CT_F_LIBERAL_SENDER | CT_F_LIBERAL_SYSCTL))
		e->verdict = CT_V_LIBERAL;
	else
		e->verdict = e->ret == 1 ? CT_V_INVALID : CT_V_IGNORED;
	return submit(e);
}
#endif

/* ---- state machine, and window reasons before 6.1 ---------------------------- */

int on_ct_log_invalid(struct pt_regs *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)PT_REGS_PARM1(ctx);
	struct nf_conn *ct = (struct nf_conn *)PT_REGS_PARM2(ctx);
	struct net *net = NULL;
	u8 protonum = 0;
	u64 fmt;
	struct ct_event *e;

	/* the helper serves every L4 tracker: keep TCP only */
	bpf_probe_read_kernel(&protonum, 1, &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple.dst.protonum);
	if (protonum != IPPROTO_TCP)
		return 0;
	e = new_event(CT_SRC_CT_LOG);
	if (!e)
		return 0;
#if CT_HELPER_STATE
	struct nf_hook_state *state = (struct nf_hook_state *)PT_REGS_PARM3(ctx);
	if (state)
		bpf_probe_read_kernel(&net, sizeof(net), &state->net);
	fmt = PT_REGS_PARM4(ctx);
	e->args[0] = PT_REGS_PARM5(ctx);
	e->args[1] = PT_REGS_PARM6(ctx);
	e->args[2] = stack_arg(ctx, 0);
	e->args[3] = stack_arg(ctx, 1);
#else
	fmt = PT_REGS_PARM3(ctx);
	e->args[0] = PT_REGS_PARM4(ctx);
	e->args[1] = PT_REGS_PARM5(ctx);
	e->args[2] = PT_REGS_PARM6(ctx);
	e->args[3] = stack_arg(ctx, 0);
#endif
	bpf_probe_read_kernel_str(e->fmt, sizeof(e->fmt), (void *)fmt);
	if (is_fmt(e->fmt, 'p', 'V', 0))
		follow_pv(e, e->args[0]);
	classify(e);
#if CT_RUNG != CT_RUNG_PRE61
	/* 6.1+: nf_tcp_log_invalid reported window reasons already */
	if (e->reason >= CT_R_SEQ_OVER && e->reason <= CT_R_LAST_WINDOW)
		return 0;
#endif
	fill_common(e, skb, ct, net);
	return submit(e);
}

/* ---- tcp_error: truncated, checksum, flags, invalid new ------------------------ */

int on_l4_log_invalid(struct pt_regs *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)PT_REGS_PARM1(ctx);
	struct net *net = NULL;
	u8 protonum;
	u64 fmt;
	struct ct_event *e;

#if CT_HELPER_STATE
	struct nf_hook_state *state = (struct nf_hook_state *)PT_REGS_PARM2(ctx);
	protonum = PT_REGS_PARM3(ctx);
	fmt = PT_REGS_PARM4(ctx);
#else
	net = (struct net *)PT_REGS_PARM2(ctx);
	protonum = PT_REGS_PARM4(ctx);
	fmt = PT_REGS_PARM5(ctx);
#endif
	if (protonum != IPPROTO_TCP)
		return 0;
	e = new_event(CT_SRC_L4_LOG);
	if (!e)
		return 0;
	bpf_probe_read_kernel_str(e->fmt, sizeof(e->fmt), (void *)fmt);
	if (is_fmt(e->fmt, 'p', 'V', 0))
		return 0;                  /* printing on behalf of nf_ct_l4proto_log_invalid */
#if CT_HELPER_STATE
	if (state)
		bpf_probe_read_kernel(&net, sizeof(net), &state->net);
	e->args[0] = PT_REGS_PARM5(ctx);
	e->args[1] = PT_REGS_PARM6(ctx);
	e->args[2] = stack_arg(ctx, 0);
	e->args[3] = stack_arg(ctx, 1);
#else
	e->args[0] = PT_REGS_PARM6(ctx);
	e->args[1] = stack_arg(ctx, 0);
	e->args[2] = stack_arg(ctx, 1);
	e->args[3] = stack_arg(ctx, 2);
#endif
	classify(e);
	fill_common(e, skb, NULL, net);
	return submit(e);
}
