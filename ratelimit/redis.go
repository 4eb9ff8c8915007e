package ratelimit

// The shared backend on Redis (standalone or Cluster).
//
// Layout under the namespace ns (keystore's, default "apikeys"); g is one
// hex digit of the subject's CRC32 on a cluster (16 groups), a hash tag,
// so one script call touches one hash slot; on a standalone server g is
// always 0, so a sync is one script call per 500 subjects:
//
//	<ns>:rl:{g}:r:<yyyymmdd>  hash  t:<subject> -> GCRA TAT (Unix µs) of the
//	                                rate limit bucket, written that UTC day;
//	                                q:<subject> -> the day quota's counter
//	                                (accepted requests plus unspent leases).
//	                                Expires at the end of the next day.
//	<ns>:rl:{g}:m:<yyyymm>    hash  q:<subject> -> the month quota's counter.
//	                                Expires a day after the month's end.
//	<ns>:rl:{g}:h:<yyyymmdd>  hash  <subject> -> "<accepted> <rate limited>
//	                                <quota exceeded>" of that UTC day.
//	                                Expires HistoryDays+2 days after the day.
//
// Every sync sends one EVALSHA per group and 500 subjects (EVAL once per
// call after NOSCRIPT), and the script runs one HMGET and one HSET per key
// it touches (plus a PEXPIRE the first time this process writes the
// key), so a sync of 10,000 subjects costs about 16 × 5 commands however
// many requests they made (on a standalone server, about 20 × 5). ACL: EVALSHA, EVAL, HMGET, HSET, PEXPIRE
// (inside the script), HGET (Usage, History).

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultRedisNamespace is the namespace when none is given, keystore's.
const DefaultRedisNamespace = "apikeys"

// redisGroups is the number of hash-tagged groups on a cluster: they
// spread the subjects over the nodes.
const redisGroups = 16

// redisChunk is how many subjects one script call handles at most.
const redisChunk = 500

// RedisBackend is the shared Backend on Redis. Create it with
// NewRedisBackend.
type RedisBackend struct {
	c      redis.UniversalClient
	ns     string
	groups uint32 // 16 on a cluster, 1 on a standalone server

	mu      sync.Mutex
	expires map[string]bool // keys whose expiry this process has set
}

var _ Backend = (*RedisBackend)(nil)

// NewRedisBackend returns a shared Backend on client, with keys under
// namespace ("" means DefaultRedisNamespace; use the key store's). The
// caller keeps ownership of client, which should have
// ContextTimeoutEnabled (keystore's clients do): only then does
// Options.Timeout bound a call to a hung server.
func NewRedisBackend(client redis.UniversalClient, namespace string) *RedisBackend {
	if namespace == "" {
		namespace = DefaultRedisNamespace
	}
	b := &RedisBackend{c: client, ns: namespace, groups: 1, expires: make(map[string]bool)}
	if _, cluster := client.(*redis.ClusterClient); cluster {
		b.groups = redisGroups
	}
	return b
}

// Shared implements Backend: true.
func (*RedisBackend) Shared() bool { return true }

func (b *RedisBackend) group(subject string) string {
	const hexDigits = "0123456789abcdef"
	g := crc32.ChecksumIEEE([]byte(subject)) % b.groups
	return b.ns + ":rl:{" + hexDigits[g:g+1] + "}:"
}

func (b *RedisBackend) rateKey(prefix string, day int32) string {
	return prefix + "r:" + dayStamp(day)
}

func (b *RedisBackend) quotaKey(prefix string, p Period, start int64) string {
	if p == Month {
		return prefix + "m:" + periodStamp(Month, start)
	}
	return b.rateKey(prefix, dayOf(start))
}

func (b *RedisBackend) histKey(prefix string, day int32) string {
	return prefix + "h:" + dayStamp(day)
}

// syncScript: see the layout above. ARGV: now (µs), read-yesterday flag
// (1/0), then nRate and per rate item subject, T (µs), B (µs), tokens
// returned, tokens wanted; nQuota and per quota item key index, subject,
// quota, returned, wanted, added; nHist and per item key index, subject,
// accepted, rate limited, quota exceeded; then per KEYS entry the
// TTL (ms) to set, or 0. KEYS[1] and KEYS[2] are today's and
// yesterday's rate hash. It returns per rate item the tokens granted and
// the TAT, then per quota item the tokens granted and the counter.
var syncScript = redis.NewScript(`
local now = tonumber(ARGV[1])
local yest = ARGV[2] == '1'
local i = 3
local nr = tonumber(ARGV[i]); local r0 = i + 1; i = r0 + 5 * nr
local nq = tonumber(ARGV[i]); local q0 = i + 1; i = q0 + 6 * nq
local nh = tonumber(ARGV[i]); local h0 = i + 1; i = h0 + 5 * nh
local e0 = i
local fields, seen = {}, {}
local function need(k, f)
	local s = seen[k]
	if not s then s = {}; seen[k] = s; fields[k] = {} end
	if not s[f] then s[f] = true; local t = fields[k]; t[#t + 1] = f end
end
for j = 0, nr - 1 do
	local f = 't:' .. ARGV[r0 + 5 * j]
	need(1, f)
	if yest then need(2, f) end
end
for j = 0, nq - 1 do need(tonumber(ARGV[q0 + 6 * j]), 'q:' .. ARGV[q0 + 6 * j + 1]) end
for j = 0, nh - 1 do need(tonumber(ARGV[h0 + 5 * j]), ARGV[h0 + 5 * j + 1]) end
local vals = {}
for k, fs in pairs(fields) do
	local got = redis.call('HMGET', KEYS[k], unpack(fs))
	local m = {}
	for x = 1, #fs do m[fs[x]] = got[x] end
	vals[k] = m
end
local dirty = {}
local function set(k, f, v)
	vals[k][f] = v
	local d = dirty[k]
	if not d then d = {}; dirty[k] = d end
	d[f] = true
end
local out = {}
for j = 0, nr - 1 do
	local b = r0 + 5 * j
	local f = 't:' .. ARGV[b]
	local T, B = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
	local ret, w = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
	local tat = tonumber(vals[1][f])
	if not tat and yest then tat = tonumber(vals[2][f]) end
	tat = (tat or now) - ret * T
	if tat < now then tat = now end
	local g = math.floor((now + B - tat) / T)
	if g > w then g = w end
	if g < 0 then g = 0 end
	tat = tat + g * T
	set(1, f, string.format('%.0f', tat))
	out[#out + 1] = g
	out[#out + 1] = tat
end
for j = 0, nq - 1 do
	local b = q0 + 6 * j
	local k, f = tonumber(ARGV[b]), 'q:' .. ARGV[b + 1]
	local Q, ret = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
	local w, add = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
	local c = (tonumber(vals[k][f]) or 0) - ret + add
	if c < 0 then c = 0 end
	local g = Q - c
	if g > w then g = w end
	if g < 0 then g = 0 end
	c = c + g
	set(k, f, string.format('%.0f', c))
	out[#out + 1] = g
	out[#out + 1] = c
end
for j = 0, nh - 1 do
	local b = h0 + 5 * j
	local k, f = tonumber(ARGV[b]), ARGV[b + 1]
	local a, r, x = 0, 0, 0
	local v = vals[k][f]
	if v then
		local s1, s2, s3 = string.match(v, '^(%d+) (%d+) (%d+)$')
		a, r, x = tonumber(s1) or 0, tonumber(s2) or 0, tonumber(s3) or 0
	end
	set(k, f, string.format('%.0f %.0f %.0f', a + tonumber(ARGV[b + 2]), r + tonumber(ARGV[b + 3]), x + tonumber(ARGV[b + 4])))
end
for k, d in pairs(dirty) do
	local args, m = {}, vals[k]
	for f in pairs(d) do args[#args + 1] = f; args[#args + 1] = m[f] end
	redis.call('HSET', KEYS[k], unpack(args))
	local e = ARGV[e0 + k - 1]
	if e ~= '0' then redis.call('PEXPIRE', KEYS[k], e) end
end
return out
`)

// redisCall is one script call: one group's chunk.
type redisCall struct {
	prefix string
	keys   []string
	kidx   map[string]int
	rate   []*syncItem
	quota  []*syncItem
	hist   []histDelta
	maxWin int64 // µs
}

func (c *redisCall) key(name string) int {
	if k, ok := c.kidx[name]; ok {
		return k
	}
	c.keys = append(c.keys, name)
	c.kidx[name] = len(c.keys)
	return len(c.keys)
}

// full reports whether c has redisChunk subjects' items (or twice as many
// daily counts).
func (c *redisCall) full() bool {
	return max(len(c.rate), len(c.quota)) >= redisChunk || len(c.hist) >= 2*redisChunk
}

// sync implements Backend.
func (b *RedisBackend) sync(ctx context.Context, now int64, items []syncItem, hist []histDelta) error {
	today := dayOf(now)
	groups := make(map[string][]*redisCall)
	get := func(subject string) *redisCall {
		p := b.group(subject)
		cs := groups[p]
		if len(cs) == 0 || cs[len(cs)-1].full() {
			c := &redisCall{prefix: p, kidx: make(map[string]int)}
			c.key(b.rateKey(p, today))
			c.key(b.rateKey(p, today-1))
			cs = append(cs, c)
			groups[p] = cs
		}
		return cs[len(cs)-1]
	}
	for k := range items {
		it := &items[k]
		c := get(it.subject)
		if it.rate {
			c.rate = append(c.rate, it)
			c.maxWin = max(c.maxWin, it.b)
		}
		if it.quota {
			c.quota = append(c.quota, it)
		}
	}
	for _, h := range hist {
		c := get(h.subject)
		c.hist = append(c.hist, h)
	}
	var calls []*redisCall
	for _, cs := range groups {
		calls = append(calls, cs...)
	}
	nowUS := now / 1000
	args := make([][]any, len(calls))
	for n, c := range calls {
		a := []any{nowUS, "0"}
		if now-int64(today)*nsPerDay < c.maxWin*1000 {
			a[1] = "1"
		}
		a = append(a, len(c.rate))
		for _, it := range c.rate {
			a = append(a, it.subject, it.t, it.b, it.ret, it.want)
		}
		a = append(a, len(c.quota))
		for _, it := range c.quota {
			a = append(a, c.key(b.quotaKey(c.prefix, it.period, it.qStart)), it.subject, it.q, it.qRet, it.qWant, it.qAdd)
		}
		a = append(a, len(c.hist))
		for _, h := range c.hist {
			a = append(a, c.key(b.histKey(c.prefix, h.day)), h.subject, h.accepted, h.limited, h.refused)
		}
		b.mu.Lock()
		for _, name := range c.keys {
			if b.expires[name] {
				a = append(a, 0)
			} else {
				// A TTL from the Limiter's clock, the one the key names
				// come from.
				a = append(a, max(expiryOf(name, c.prefix)-now/1e6, 1))
			}
		}
		b.mu.Unlock()
		args[n] = a
	}
	replies, err := b.run(ctx, calls, args)
	if err != nil {
		b.mu.Lock()
		clear(b.expires) // the server may have lost the keys
		b.mu.Unlock()
		return err
	}
	b.mu.Lock()
	if len(b.expires) > 100_000 {
		clear(b.expires)
	}
	for _, c := range calls {
		for _, name := range c.keys[2:] {
			b.expires[name] = true
		}
		if len(c.rate) > 0 {
			b.expires[c.keys[0]] = true
		}
	}
	b.mu.Unlock()
	for n, c := range calls {
		out := replies[n]
		if len(out) != 2*(len(c.rate)+len(c.quota)) {
			return fmt.Errorf("%w: sync script answered %d values, want %d", ErrUnavailable, len(out), 2*(len(c.rate)+len(c.quota)))
		}
		for j, it := range c.rate {
			it.grant, it.tatUS = out[2*j], out[2*j+1]
		}
		o := 2 * len(c.rate)
		for j, it := range c.quota {
			it.qGrant, it.count = out[o+2*j], out[o+2*j+1]
		}
	}
	return nil
}

// expiryOf returns the time (Unix ms) key name under prefix expires.
func expiryOf(name, prefix string) int64 {
	rest := name[len(prefix):]
	kind, stamp := rest[:1], rest[2:]
	switch kind {
	case "m":
		t, _ := time.Parse("200601", stamp)
		return t.AddDate(0, 1, 1).UnixMilli()
	case "h":
		t, _ := time.Parse("20060102", stamp)
		return t.AddDate(0, 0, HistoryDays+2).UnixMilli()
	default: // r
		t, _ := time.Parse("20060102", stamp)
		return t.AddDate(0, 0, 2).UnixMilli()
	}
}

// run sends the calls in one pipeline by SHA, again with the script
// itself for those the server answered NOSCRIPT.
func (b *RedisBackend) run(ctx context.Context, calls []*redisCall, args [][]any) ([][]int64, error) {
	out := make([][]int64, len(calls))
	pending := make([]int, len(calls))
	for n := range pending {
		pending[n] = n
	}
	for _, bySHA := range []bool{true, false} {
		if len(pending) == 0 {
			break
		}
		cmds := make([]*redis.Cmd, len(pending))
		_, _ = b.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for j, n := range pending {
				if bySHA {
					cmds[j] = syncScript.EvalSha(ctx, p, calls[n].keys, args[n]...)
				} else {
					cmds[j] = syncScript.Eval(ctx, p, calls[n].keys, args[n]...)
				}
			}
			return nil
		})
		var retry []int
		for j, n := range pending {
			vals, err := cmds[j].Int64Slice()
			switch {
			case err == nil:
				out[n] = vals
			case bySHA && redis.HasErrorPrefix(err, "NOSCRIPT"):
				retry = append(retry, n)
			default:
				return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
			}
		}
		pending = retry
	}
	return out, nil
}

// quotaCount implements Backend: the shared counter.
func (b *RedisBackend) quotaCount(ctx context.Context, subject string, p Period, start int64) (int64, error) {
	v, err := b.c.HGet(ctx, b.quotaKey(b.group(subject), p, start), "q:"+subject).Result()
	if errors.Is(err, redis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	n, _ := strconv.ParseInt(v, 10, 64)
	return n, nil
}

// History implements Backend: one HGET per day, in one pipeline.
func (b *RedisBackend) History(ctx context.Context, subject string, from, to time.Time) ([]DayCount, error) {
	first, last := dayOf(from.UnixNano()), dayOf(to.UnixNano())
	out := emptyHistory(first, last)
	if len(out) == 0 {
		return out, nil
	}
	prefix := b.group(subject)
	cmds := make([]*redis.StringCmd, len(out))
	_, _ = b.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for k := range out {
			cmds[k] = p.HGet(ctx, b.histKey(prefix, first+int32(k)), subject)
		}
		return nil
	})
	for k, cmd := range cmds {
		v, err := cmd.Result()
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		var a, r, x int64
		if _, err := fmt.Sscanf(v, "%d %d %d", &a, &r, &x); err == nil {
			out[k].Accepted, out[k].RateLimited, out[k].QuotaExceeded = a, r, x
		}
	}
	return out, nil
}
