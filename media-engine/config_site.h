/*
 * config_site.h — build configuration of the softswitch media engine.
 *
 * pjproject reads this file (as pjlib/include/pj/config_site.h) before its
 * own defaults, so every value here overrides the library default of the
 * same name. scripts/build-media-engine.sh copies it into the pjproject tree
 * and hashes it into the cache key: changing a value rebuilds the engine.
 *
 * A media worker is one process with one pjsua endpoint that holds many
 * concurrent SIP calls (RFC 3261 dialogs, each with an RFC 3550 RTP/RTCP
 * session), bridged in the pjmedia conference bridge. The stock defaults
 * are sized for a phone: 4 calls, 8 accounts, 254 bridge ports, 64 sockets
 * in the I/O queue. The values below size it for a switch. See
 * docs/media-engine.md for the reasoning and the measured capacity.
 */
#ifndef SOFTSWITCH_MEDIA_ENGINE_CONFIG_SITE_H
#define SOFTSWITCH_MEDIA_ENGINE_CONFIG_SITE_H

/* ---------------------------------------------------------------- pjlib */

/* Loopback and phones may be IPv6: keep the IPv6 code paths compiled in. */
#define PJ_HAS_IPV6                             1

/*
 * Sockets one I/O queue may hold. Every call owns two UDP sockets (RTP and
 * RTCP, RFC 3550 section 11), so 1024 calls need 2048 handles; the rest is
 * headroom for SIP transports (UDP, TCP listeners and connections).
 * The epoll backend (configure --enable-epoll) has no FD_SETSIZE cap, so
 * this number, not select(), is the limit. pjsip uses the same value for
 * PJSIP_MAX_TRANSPORTS.
 */
#define PJ_IOQUEUE_MAX_HANDLES                  4096

/*
 * Events handled per poll. The default (16) means a worker under load
 * needs many libHandleEvents() turns to drain one busy epoll set; 64 keeps
 * latency flat with a thousand RTP sockets ready at once.
 */
#define PJ_IOQUEUE_MAX_EVENTS_IN_SINGLE_POLL    64

/* ---------------------------------------------------------------- pjsip */

/*
 * Hash table sizes (2^n - 1) of the transaction and dialog tables. The
 * defaults (1023 / 511) are bucket counts, not caps, but with two dialogs
 * per bridged conversation a switch holding 1024 calls wants enough
 * buckets that lookups stay O(1). RFC 3261 section 17 transactions outlive
 * their dialog by Timer D/K, hence twice as many transactions.
 */
#define PJSIP_MAX_DIALOG_COUNT                  (2048 - 1)
#define PJSIP_MAX_TSX_COUNT                     (4096 - 1)

/*
 * Kernel receive/send buffer asked for on SIP UDP sockets. Bursts of
 * INVITEs at a few hundred calls per second overflowed the default buffer
 * (receive-buffer errors, then RFC 3261 section 17.1.1.2 retransmissions).
 * pjsip lowers the request step by step if the kernel refuses it.
 */
#define PJSIP_UDP_SO_RCVBUF_SIZE                (4 * 1024 * 1024)
#define PJSIP_UDP_SO_SNDBUF_SIZE                (4 * 1024 * 1024)

/* ---------------------------------------------------------------- pjsua */

/*
 * Concurrent calls (legs) per process. A bridged conversation is two legs,
 * a consult three, a supervised call four: 1024 legs are 512 bridged
 * conversations, more than two cores carry with RTP, so the CPU, not this
 * table, is the limit. UaConfig.maxCalls must be raised at run time too
 * (its default is 4); pjsua clamps it to this value.
 */
#define PJSUA_MAX_CALLS                         1024

/*
 * Accounts per process. The stock 8 aborts the process (an assert) on the
 * ninth Account; a worker needs one per local identity it answers for.
 */
#define PJSUA_MAX_ACC                           64

/*
 * File players and recorders (prompts, music on hold, call recording):
 * one of each per leg at the same time.
 */
#define PJSUA_MAX_PLAYERS                       PJSUA_MAX_CALLS
#define PJSUA_MAX_RECORDERS                     PJSUA_MAX_CALLS

/*
 * Conference bridge slots: every leg, player, recorder and tone generator
 * takes one. Four per call covers a leg with a prompt, a recording and a
 * tone at once; it must be at least 2 x PJSUA_MAX_CALLS.
 */
#define PJSUA_MAX_CONF_PORTS                    (4 * PJSUA_MAX_CALLS)

/*
 * Bridge clock rate. Nearly every leg is G.711 (8 kHz): bridging at 8 kHz
 * spares a resampler per G.711 port per 20 ms frame. G.722 legs (16 kHz)
 * are resampled; MediaConfig.clockRate can still be set at run time.
 */
#define PJSUA_DEFAULT_CLOCK_RATE                8000

/* -------------------------------------------------------------- pjmedia */

/* Audio only: no video code, devices or codecs. */
#define PJMEDIA_HAS_VIDEO                       0

/*
 * Media lines (RFC 4566 section 5.14 "m=") per SDP. pjsua keeps two
 * arrays of this many stream slots (~4.8 KB each) in every call slot,
 * statically: the default 16 makes each of the 1024 slots 155 KB, 160 MB
 * resident per process before the first call. Phones offer one to four
 * m-lines (audio, video, content, BFCP); 8 keeps headroom at half the
 * memory. The SDP parser drops m-lines past this count (the answer would
 * then lack them, against RFC 3264 section 6), so keep it generous.
 */
#define PJMEDIA_MAX_SDP_MEDIA                   8

/*
 * No sound card: the endpoint runs on the null audio device (setNullDev())
 * and the bridge is clocked by its own timer. Keep the null device compiled
 * in and every real backend out.
 */
#define PJMEDIA_AUDIO_DEV_HAS_NULL_AUDIO        1
#define PJMEDIA_AUDIO_DEV_HAS_ALSA              0
#define PJMEDIA_AUDIO_DEV_HAS_PORTAUDIO         0

/*
 * Mixing bridge, not the switch board: conferences, whisper and barge need
 * more than two parties on one port.
 */
#define PJMEDIA_CONF_USE_SWITCH_BOARD           0

/*
 * Echo cancellation belongs next to a loudspeaker, not in a switch: the
 * bridge passes audio through untouched. (The Speex and WebRTC AECs are
 * also left out of the build.)
 */
#define PJMEDIA_HAS_SPEEX_AEC                   0

/* Codecs whose sources the Debian repack of the tree does not carry. */
#define PJMEDIA_HAS_GSM_CODEC                   0
#define PJMEDIA_HAS_SPEEX_CODEC                 0
#define PJMEDIA_HAS_ILBC_CODEC                  0
#define PJMEDIA_HAS_G7221_CODEC                 0
#define PJMEDIA_HAS_OPENCORE_AMRNB_CODEC        0
#define PJMEDIA_HAS_OPENCORE_AMRWB_CODEC        0
#define PJMEDIA_HAS_SILK_CODEC                  0
#define PJMEDIA_HAS_OPUS_CODEC                  0
#define PJMEDIA_HAS_BCG729                      0

/* What a switch speaks: G.711 (PCMU/PCMA), G.722 and L16 (RFC 3551). */
#define PJMEDIA_HAS_G711_CODEC                  1
#define PJMEDIA_HAS_G722_CODEC                  1
#define PJMEDIA_HAS_L16_CODEC                   1

/* Table-driven G.711: a lookup per sample instead of arithmetic. */
#define PJMEDIA_HAS_ALAW_ULAW_TABLE             1

#endif /* SOFTSWITCH_MEDIA_ENGINE_CONFIG_SITE_H */
