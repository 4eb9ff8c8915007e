package keystore

// This file implements Store on Redis: standalone, or Redis Cluster when
// several seed URLs are given.
//
// Every command touches a single key, so the store works unchanged on a
// cluster, where keys live in different hash slots. The layout under the
// namespace ns (default "apikeys") is:
//
//	<ns>:id:<key ID>           string  hex digest of the key
//	<ns>:digest:<hex digest>   string  JSON Key record
//	<ns>:owner:<sha256 owner>  zset    index members, all scores 0 (see index.go)
//	<ns>:lastused:<b>          hash    key ID -> last use, unix milliseconds
//	                                   (decimal); b is one hex digit of the
//	                                   ID's CRC32, 16 buckets (redis_usage.go)
//	<ns>:used:<key ID>         string  last use as above, as written before
//	                                   the buckets; still read, never written
//	<ns>:idem:<record ID>      string  "<token>\n<JSON IdempotencyRecord>", with a TTL
//	<ns>:version               string  counter of record changes (not on a cluster)
//	<ns>:live:{<sha256 owner>}[:ready]  the live-key index (see redis_live.go)
//
// Create reserves the key's place in the live index (checking the owner's
// limit in the same script), then writes id, owner index, then digest
// record, each with NX. Only the last write makes a key findable by digest
// (that is, valid), so a Create interrupted at any point leaves nothing that
// validates; what it did leave is ignored by reads and completed by a retry
// with the same key.
//
// Retention is left to the server: a key with an end (Key.End) has its id,
// digest and used keys expire (PEXPIREAT) at end plus retention. Create sets
// it on the id and digest keys as it writes them; Update sets it on the
// digest key in the same transaction as the record, then on the id and used
// keys, and re-reads the record to repair a race with another Update.
// Last-use times live in 16 bucket hashes, so that RecordUsage writes
// thousands of them with a handful of commands; a field outlives its key
// until List walks past the key's index member and removes both. Reads
// treat a missing record as a missing key, and List removes owner-index
// members whose id key is gone (it is written before the member, so a
// Create in flight always has one).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Defaults of [RedisOptions].
const (
	// DefaultRedisNamespace prefixes every Redis key the store writes.
	DefaultRedisNamespace = "apikeys"
	// DefaultRedisDialTimeout bounds establishing one connection.
	DefaultRedisDialTimeout = 2 * time.Second
	// DefaultRedisReadTimeout bounds waiting for one reply.
	DefaultRedisReadTimeout = time.Second
	// DefaultRedisWriteTimeout bounds sending one command.
	DefaultRedisWriteTimeout = time.Second
	// DefaultRedisMaxRetries is how often a failed command is retried (for
	// example once on a pooled connection that the server closed), unless
	// the URL sets max_retries.
	DefaultRedisMaxRetries = 1
)

// RedisOptions configures [NewRedis]. Zero values mean the documented
// default.
type RedisOptions struct {
	// URLs are redis:// or rediss:// URLs, with optional user, password,
	// database number (/N) and go-redis query options
	// (redis://user:pass@host:6379/0?pool_size=20). One URL connects to a
	// standalone server; several URLs are seed nodes of a Redis Cluster
	// (database 0 only; query options are taken from the first URL).
	//
	// A single URL of the form
	// redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db]
	// connects to the primary that the listed Sentinels (port default
	// 26379) name for master-name, and follows failovers. user and pass
	// authenticate to the primary and replicas; the query options
	// sentinel_username and sentinel_password, to the Sentinels; other
	// query options are those of redis:// URLs.
	URLs []string
	// Namespace prefixes every Redis key; default "apikeys"
	// ([DefaultRedisNamespace]).
	Namespace string
	// DialTimeout bounds establishing a connection; default 2s
	// ([DefaultRedisDialTimeout]). A non-zero value overrides the URL's
	// dial_timeout.
	DialTimeout time.Duration
	// ReadTimeout bounds waiting for a reply; default 1s
	// ([DefaultRedisReadTimeout]). A non-zero value overrides the URL's
	// read_timeout.
	ReadTimeout time.Duration
	// WriteTimeout bounds sending a command; default 1s
	// ([DefaultRedisWriteTimeout]). A non-zero value overrides the URL's
	// write_timeout.
	WriteTimeout time.Duration
	// Retention is how long revoked and expired keys are kept after they
	// stop validating (from the earlier of revocation and expiry), so they
	// can still be listed and inspected; then Redis expires them. Default
	// 30 days ([DefaultRetention]); zero means the default, negative is
	// invalid.
	Retention time.Duration
	// WaitReplicas, when above 0, makes each write of Create wait (Redis
	// WAIT) until that many replicas of its primary acknowledged it, and
	// fail otherwise; default 0 (no wait). With Sentinel, or a Cluster with
	// replicas, set it to 1 or more: replication is asynchronous, so
	// without it a key written to a primary just before a failover can be
	// lost, or half-written, though Create returned nil.
	WaitReplicas int
	// WaitTimeout bounds each such wait; default 1s
	// ([DefaultRedisWaitTimeout]). It is cut to 3/4 of the time left before
	// the read deadline (the caller's, or ReadTimeout), so the reply of a
	// wait that timed out still arrives.
	WaitTimeout time.Duration
}

// ParseRedisOptions turns opts into go-redis client options. One URL gives
// options for a standalone client; several give Cluster seed nodes, which
// must agree on TLS and credentials; one redis+sentinel:// URL gives options
// for a Sentinel-managed primary (see [RedisOptions.URLs]). Beyond what the URLs say it sets:
// the timeouts (see [RedisOptions]), DefaultRedisMaxRetries unless the URL
// sets max_retries, a single dial attempt per connection (so an unreachable
// server fails within about DialTimeout), and ContextTimeoutEnabled, so a
// caller's context deadline bounds each command.
//
// Errors never contain a password: URLs appear in them redacted.
func ParseRedisOptions(opts RedisOptions) (*redis.UniversalOptions, error) {
	if len(opts.URLs) == 0 {
		return nil, errors.New("keystore: no Redis URL given")
	}
	if hasSentinelURL(opts.URLs) {
		uo, err := parseSentinelURLs(opts.URLs)
		if err != nil {
			return nil, err
		}
		return finishRedisOptions(opts, uo), nil
	}
	var (
		uo       *redis.UniversalOptions
		userInfo string // username and password of the first URL that has them
	)
	for i, raw := range opts.URLs {
		u, o, err := parseRedisURL(i, raw)
		if err != nil {
			return nil, err
		}
		if len(opts.URLs) > 1 && o.DB != 0 {
			return nil, fmt.Errorf("keystore: redis URL %s: Redis Cluster has only database 0", u.Redacted())
		}
		if uo == nil {
			uo = universalFromOptions(o)
			uo.MaxRetries = DefaultRedisMaxRetries
			if u.Query().Has("max_retries") {
				uo.MaxRetries = o.MaxRetries
			}
			if o.Username != "" || o.Password != "" {
				userInfo = o.Username + "\x00" + o.Password
			}
			continue
		}
		// Further cluster seeds: only the address is new, the rest must agree.
		if (o.TLSConfig != nil) != (uo.TLSConfig != nil) {
			return nil, errors.New("keystore: redis cluster URLs mix redis:// and rediss://")
		}
		if o.Username != "" || o.Password != "" {
			if ui := o.Username + "\x00" + o.Password; userInfo == "" {
				userInfo = ui
				uo.Username, uo.Password = o.Username, o.Password
			} else if ui != userInfo {
				return nil, errors.New("keystore: redis cluster URLs carry different credentials")
			}
		}
		uo.Addrs = append(uo.Addrs, o.Addr)
	}
	if len(uo.Addrs) > 1 {
		uo.IsClusterMode = true
		uo.DB = 0
	}

	return finishRedisOptions(opts, uo), nil
}

// finishRedisOptions sets what ParseRedisOptions sets beyond the URLs.
func finishRedisOptions(opts RedisOptions, uo *redis.UniversalOptions) *redis.UniversalOptions {
	uo.DialTimeout = pickDuration(opts.DialTimeout, uo.DialTimeout, DefaultRedisDialTimeout)
	uo.ReadTimeout = pickDuration(opts.ReadTimeout, uo.ReadTimeout, DefaultRedisReadTimeout)
	uo.WriteTimeout = pickDuration(opts.WriteTimeout, uo.WriteTimeout, DefaultRedisWriteTimeout)
	uo.DialerRetries = 1
	uo.ContextTimeoutEnabled = true
	return uo
}

// parseRedisURL parses the i-th configured URL with go-redis, without ever
// putting the raw URL (which may hold a password) into an error.
func parseRedisURL(i int, raw string) (*url.URL, *redis.Options, error) {
	u, err := url.Parse(raw)
	if err != nil {
		msg := fmt.Sprintf("keystore: redis URL #%d is not a valid URL", i+1)
		var ue *url.Error
		if !strings.Contains(raw, "@") && errors.As(err, &ue) {
			return nil, nil, fmt.Errorf("%s: %w", msg, ue.Err)
		}
		return nil, nil, errors.New(msg + " (not shown: it may contain a password)")
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return nil, nil, fmt.Errorf("keystore: redis URL %s: scheme must be redis:// or rediss://", u.Redacted())
	}
	o, err := redis.ParseURL(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("keystore: redis URL %s: %w", u.Redacted(), err)
	}
	return u, o, nil
}

// universalFromOptions copies what redis.ParseURL can set into
// UniversalOptions.
func universalFromOptions(o *redis.Options) *redis.UniversalOptions {
	return &redis.UniversalOptions{
		Addrs:                   []string{o.Addr},
		ClientName:              o.ClientName,
		DB:                      o.DB,
		Protocol:                o.Protocol,
		Username:                o.Username,
		Password:                o.Password,
		MinRetryBackoff:         o.MinRetryBackoff,
		MaxRetryBackoff:         o.MaxRetryBackoff,
		DialTimeout:             o.DialTimeout,
		ReadTimeout:             o.ReadTimeout,
		WriteTimeout:            o.WriteTimeout,
		PoolFIFO:                o.PoolFIFO,
		PoolSize:                o.PoolSize,
		MaxConcurrentDials:      o.MaxConcurrentDials,
		PoolTimeout:             o.PoolTimeout,
		MinIdleConns:            o.MinIdleConns,
		MaxIdleConns:            o.MaxIdleConns,
		MaxActiveConns:          o.MaxActiveConns,
		ConnMaxIdleTime:         o.ConnMaxIdleTime,
		ConnMaxLifetime:         o.ConnMaxLifetime,
		ConnMaxLifetimeJitter:   o.ConnMaxLifetimeJitter,
		PipelinePoolSize:        o.PipelinePoolSize,
		PipelineReadBufferSize:  o.PipelineReadBufferSize,
		PipelineWriteBufferSize: o.PipelineWriteBufferSize,
		TLSConfig:               o.TLSConfig,
	}
}

// pickDuration returns the first of explicit, fromURL, def that is set.
func pickDuration(explicit, fromURL, def time.Duration) time.Duration {
	switch {
	case explicit != 0:
		return explicit
	case fromURL != 0:
		return fromURL
	default:
		return def
	}
}

// RedisStore is a [Store] on Redis (standalone or Cluster). Create it with
// [NewRedis] or [NewRedisFromClient].
type RedisStore struct {
	c         redis.UniversalClient
	ns        string
	retention time.Duration
	ownClient bool // Close closes c only if NewRedis created it

	waitReplicas int           // see RedisOptions.WaitReplicas
	waitTimeout  time.Duration // see RedisOptions.WaitTimeout
	readTimeout  time.Duration // the client's; bounds waitTimeout
}

var _ Store = (*RedisStore)(nil)

// NewRedis returns a RedisStore with a new client built from opts (see
// [ParseRedisOptions]). It does not contact Redis; call Ping to check that
// the server is reachable.
func NewRedis(opts RedisOptions) (*RedisStore, error) {
	retention, err := checkRetention(opts.Retention)
	if err != nil {
		return nil, err
	}
	uo, err := ParseRedisOptions(opts)
	if err != nil {
		return nil, err
	}
	if opts.WaitReplicas < 0 {
		return nil, fmt.Errorf("keystore: WaitReplicas must not be negative, got %d", opts.WaitReplicas)
	}
	s := NewRedisFromClient(redis.NewUniversalClient(uo), opts.Namespace)
	s.ownClient = true
	s.retention = retention
	s.waitReplicas = opts.WaitReplicas
	s.waitTimeout = pickDuration(opts.WaitTimeout, 0, DefaultRedisWaitTimeout)
	s.readTimeout = uo.ReadTimeout
	return s, nil
}

// NewRedisFromClient returns a RedisStore on an existing client, with keys
// under namespace ("" means [DefaultRedisNamespace]) and the default
// retention ([DefaultRetention]). Close does not close c; its owner does.
func NewRedisFromClient(c redis.UniversalClient, namespace string) *RedisStore {
	if namespace == "" {
		namespace = DefaultRedisNamespace
	}
	return &RedisStore{c: c, ns: namespace, retention: DefaultRetention}
}

// Client returns the store's Redis client, for a component that keeps its
// own keys beside the store's (the rate limiter); the store owns it.
func (s *RedisStore) Client() redis.UniversalClient { return s.c }

// Namespace returns the prefix of the store's Redis keys.
func (s *RedisStore) Namespace() string { return s.ns }

func (s *RedisStore) idKey(id string) string      { return s.ns + ":id:" + id }
func (s *RedisStore) digestKey(hex string) string { return s.ns + ":digest:" + hex }
func (s *RedisStore) ownerKey(owner string) string {
	return s.ns + ":owner:" + ownerHash(owner)
}
func (s *RedisStore) idemKey(id string) string { return s.ns + ":idem:" + id }
func (s *RedisStore) versionKey() string       { return s.ns + ":version" }

// cluster reports whether the store is on a Redis Cluster.
func (s *RedisStore) cluster() bool {
	_, ok := s.c.(*redis.ClusterClient)
	return ok
}

// RecordsVersion returns a number that every change of a stored key record
// (Update and Revoke) increases in the same transaction as the change, so
// that a cache can tell that none of the records it holds changed since it
// last read the number, without reading them (see CachedStore). ok is false
// on a Redis Cluster, where the record and the number live on different
// nodes: there a cache re-reads its records.
func (s *RedisStore) RecordsVersion(ctx context.Context) (v int64, ok bool, err error) {
	if s.cluster() {
		return 0, false, nil
	}
	v, err = s.c.Get(ctx, s.versionKey()).Int64()
	if errors.Is(err, redis.Nil) {
		return 0, true, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("keystore: redis get records version: %w", err)
	}
	return v, true, nil
}
func (s *RedisStore) usedKey(id string) string { return s.ns + ":used:" + id }

// expireAt returns when the Redis keys of k expire under retention, in unix
// milliseconds (at least 1, so that an end long past is still a valid
// PEXPIREAT), or 0 if k has no end.
func (s *RedisStore) expireAt(k *Key) int64 {
	at, ok := deleteAt(k, s.retention)
	if !ok {
		return 0
	}
	return max(at.UnixMilli(), 1)
}

// expireArgs returns the SET arguments that give a key the expiry ms (see
// expireAt; 0 means none) and the given mode ("NX", "XX").
func expireArgs(mode string, ms int64) redis.SetArgs {
	a := redis.SetArgs{Mode: mode}
	if ms > 0 {
		a.ExpireAt = time.UnixMilli(ms)
	}
	return a
}

// Create implements [Store.Create]: CreateLimited without a limit.
func (s *RedisStore) Create(ctx context.Context, k *Key) error {
	return s.CreateLimited(ctx, k, 0, time.Now())
}

// CreateLimited implements [Store.CreateLimited]: k's place in the live
// index (the atomic limit check), then three single-key writes, in an order
// that is safe to interrupt (see the file comment), then the confirmation
// of its place.
func (s *RedisStore) CreateLimited(ctx context.Context, k *Key, limit int, now time.Time) error {
	record, err := checkCreate(k, limit)
	if err != nil {
		return err
	}
	digestHex := k.Digest.String()
	expireAt := s.expireAt(k) // a key created with an end expires from birth

	// 0. Reserve k's place under the limit. A retry of a Create that
	// completed succeeds whatever the count.
	reserved, err := s.reserveLive(ctx, k, limit, now)
	if errors.Is(err, ErrLimitReached) {
		if stored, serr := s.created(ctx, k, digestHex); serr != nil || stored == nil {
			return err
		}
		return nil
	} else if err != nil {
		return err
	}
	// release gives up the place if this call reserved it (a conflict
	// never takes another key's place away).
	release := func() {
		if reserved {
			s.releaseLive(ctx, k)
		}
	}

	// 1. Claim the ID for this digest.
	claimed, err := s.setNX(ctx, s.idKey(k.ID), digestHex, expireAt)
	if err != nil {
		return fmt.Errorf("keystore: redis create key (id): %w", err)
	}
	if !claimed {
		cur, err := s.c.Get(ctx, s.idKey(k.ID)).Result()
		if err != nil {
			// redis.Nil included: the value that made SET NX fail is gone
			// only if retention expired it in between; the retry decides.
			return fmt.Errorf("keystore: redis create key (read id): %w", err)
		}
		d, err := ParseDigest(cur)
		if err != nil || !d.Equal(k.Digest) {
			release()
			return ErrConflict
		}
	}

	// 2. List it under its owner. Until step 3 the entry is skipped by List.
	if err := s.write(ctx, s.ownerKey(k.Owner), func(p redis.Cmdable) redis.Cmder {
		return p.ZAdd(ctx, s.ownerKey(k.Owner), redis.Z{Member: indexMember(k)})
	}); err != nil {
		return fmt.Errorf("keystore: redis create key (owner index): %w", err)
	}

	// 3. Publish the record: from here on the key validates.
	stored, err := s.setNX(ctx, s.digestKey(digestHex), record, expireAt)
	if err != nil {
		return fmt.Errorf("keystore: redis create key (record): %w", err)
	}
	if !stored {
		existing, err := s.getRecord(ctx, digestHex)
		if err != nil {
			return err
		}
		if existing.ID != k.ID {
			release()
			return ErrConflict
		}
		// A retry: confirm the place with the stored record's end (a key
		// revoked since then gets its past end and does not count).
		return s.confirmLive(ctx, existing)
	}
	return s.confirmLive(ctx, k)
}

// created returns k's stored record if k is stored completely already: its
// ID names its digest, whose record is k's; else nil. An ID or record of
// another key gives ErrConflict.
func (s *RedisStore) created(ctx context.Context, k *Key, digestHex string) (*Key, error) {
	cur, err := s.c.Get(ctx, s.idKey(k.ID)).Result()
	switch {
	case errors.Is(err, redis.Nil):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("keystore: redis create key (read id): %w", err)
	}
	if d, err := ParseDigest(cur); err != nil || !d.Equal(k.Digest) {
		return nil, ErrConflict
	}
	existing, err := s.getRecord(ctx, digestHex)
	switch {
	case errors.Is(err, ErrNotFound):
		return nil, nil // an interrupted Create: finish it
	case err != nil:
		return nil, err
	case existing.ID != k.ID:
		return nil, ErrConflict
	}
	return existing, nil
}

// getRecord reads and decodes the record at <ns>:digest:<digestHex>.
func (s *RedisStore) getRecord(ctx context.Context, digestHex string) (*Key, error) {
	data, err := s.c.Get(ctx, s.digestKey(digestHex)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: redis get key: %w", err)
	}
	return decodeKey(data)
}

// ByDigest implements [Store.ByDigest].
func (s *RedisStore) ByDigest(ctx context.Context, d Digest) (*Key, error) {
	k, err := s.getRecord(ctx, d.String())
	if err != nil {
		return nil, err
	}
	if !k.Digest.Equal(d) {
		return nil, errors.New("keystore: stored key record does not match its digest")
	}
	return k, nil
}

// digestOf returns the hex digest the ID points to, or ErrNotFound.
func (s *RedisStore) digestOf(ctx context.Context, id string) (string, error) {
	if id == "" {
		return "", ErrNotFound
	}
	digestHex, err := s.c.Get(ctx, s.idKey(id)).Result()
	if errors.Is(err, redis.Nil) {
		return "", ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("keystore: redis get key id: %w", err)
	}
	return digestHex, nil
}

// Get implements [Store.Get]: the id key, then the record and the last-use
// time in one pipeline.
func (s *RedisStore) Get(ctx context.Context, id string) (*Key, error) {
	digestHex, err := s.digestOf(ctx, id)
	if err != nil {
		return nil, err
	}
	var (
		recCmd  *redis.StringCmd
		usedCmd usedCmds
	)
	_, _ = s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		recCmd = p.Get(ctx, s.digestKey(digestHex))
		usedCmd = s.queueUsed(ctx, p, id)
		return nil
	})
	data, err := recCmd.Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: redis get key: %w", err)
	}
	k, err := decodeKey(data)
	if err != nil {
		return nil, err
	}
	if k.ID != id {
		// The ID was claimed by a Create whose digest belongs to another
		// key (it failed with ErrConflict); the ID names no key.
		return nil, ErrNotFound
	}
	if k.LastUsedAt, err = usedCmd.time(); err != nil {
		return nil, fmt.Errorf("keystore: redis get key (last used): %w", err)
	}
	return k, nil
}

// List implements [Store.List]. It walks the owner's index backwards in
// batches, resolving each member to its record (and last-use time) with two
// pipelines, and skips members without a record (interrupted or conflicting
// Creates, keys deleted by retention). Members whose id key is gone too
// (deleted by retention) are removed from the index on the way.
func (s *RedisStore) List(ctx context.Context, owner, cursor string, limit int) ([]*Key, string, error) {
	if err := checkLimit(limit); err != nil {
		return nil, "", err
	}
	if err := checkCursor(cursor); err != nil {
		return nil, "", err
	}
	start := "+"
	if cursor != "" {
		start = "(" + cursor
	}
	ownerKey := s.ownerKey(owner)

	// Collect limit+1 keys: the extra one tells whether there is a next page.
	var (
		keys    []*Key
		members []string
		skipped int
	)
	for len(keys) <= limit {
		if skipped >= maxListSkip {
			// Walked past many members without a record: return what
			// was found, and go on from here next time.
			return keys, strings.TrimPrefix(start, "("), nil
		}
		if err := ctx.Err(); err != nil {
			return nil, "", fmt.Errorf("keystore: redis list keys: %w", err)
		}
		want := limit + 1 - len(keys)
		batch, err := s.c.ZRangeArgs(ctx, redis.ZRangeArgs{
			Key: ownerKey, Start: start, Stop: "-",
			ByLex: true, Rev: true, Count: int64(want),
		}).Result()
		if err != nil {
			return nil, "", fmt.Errorf("keystore: redis list keys: %w", err)
		}
		found, err := s.resolve(ctx, owner, ownerKey, batch)
		if err != nil {
			return nil, "", err
		}
		for i, k := range found {
			if k != nil {
				keys = append(keys, k)
				members = append(members, batch[i])
			} else {
				skipped++
			}
		}
		if len(batch) < want {
			break // the index has no more members
		}
		start = "(" + batch[len(batch)-1]
	}

	if len(keys) <= limit {
		return keys, "", nil
	}
	return keys[:limit], members[limit-1], nil
}

// resolve looks up the records of index members; the result has nil where a
// member has no (matching) record. It removes members whose id key is gone
// from the index at ownerKey.
func (s *RedisStore) resolve(ctx context.Context, owner, ownerKey string, members []string) ([]*Key, error) {
	out := make([]*Key, len(members))
	if len(members) == 0 {
		return out, nil
	}
	ids := make([]string, len(members))
	for i, m := range members {
		ids[i], _ = memberID(m)
	}

	idCmds := make([]*redis.StringCmd, len(members))
	_, _ = s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range ids {
			idCmds[i] = p.Get(ctx, s.idKey(id))
		}
		return nil
	})

	// Per-key GETs rather than MGET: on a cluster the keys live in
	// different slots, and the pipeline sends each to its node.
	recCmds := make([]*redis.StringCmd, len(members))
	used := make([]usedCmds, len(members))
	var (
		gone    []any
		goneIDs []string
	)
	for i, cmd := range idCmds {
		err := cmd.Err()
		switch {
		case errors.Is(err, redis.Nil):
			// The id key is written before the member, so a missing one
			// means retention deleted the key: drop the member.
			gone = append(gone, members[i])
			goneIDs = append(goneIDs, ids[i])
		case err != nil:
			return nil, fmt.Errorf("keystore: redis list keys (ids): %w", err)
		}
	}
	_, _ = s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, cmd := range idCmds {
			if digestHex, err := cmd.Result(); err == nil {
				recCmds[i] = p.Get(ctx, s.digestKey(digestHex))
				used[i] = s.queueUsed(ctx, p, ids[i])
			}
		}
		if len(gone) > 0 {
			// Best effort: a failure leaves members that the next List
			// skips and removes again.
			p.ZRem(ctx, ownerKey, gone...)
			s.queueForgetUsed(ctx, p, goneIDs)
		}
		return nil
	})

	for i, cmd := range recCmds {
		if cmd == nil {
			continue
		}
		data, err := cmd.Bytes()
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("keystore: redis list keys (records): %w", err)
		}
		k, err := decodeKey(data)
		if err != nil {
			return nil, err
		}
		if k.ID != ids[i] || k.Owner != owner {
			continue
		}
		if k.LastUsedAt, err = used[i].time(); err != nil {
			return nil, fmt.Errorf("keystore: redis list keys (last used): %w", err)
		}
		out[i] = k
	}
	return out, nil
}

// Revoke implements [Store.Revoke] on top of Update, so concurrent revokes
// agree on one RevokedAt.
func (s *RedisStore) Revoke(ctx context.Context, id string, at time.Time) (*Key, error) {
	return s.Update(ctx, id, func(k *Key) error {
		if k.RevokedAt == nil {
			k.RevokedAt = &at
		}
		return nil
	})
}

// updateAttempts bounds the optimistic-locking retries of Update. Between
// attempts it backs off for a random time of up to updateMaxBackoff, so that
// many writers of one key spread out rather than collide again.
const (
	updateAttempts   = 64
	updateMaxBackoff = 20 * time.Millisecond
)

// Update implements [Store.Update] with WATCH/MULTI on the record's single
// key (valid on a cluster), retried when another writer changed it. The
// record and its expiry are written in one transaction; the id and used
// keys follow (see syncExpiry).
func (s *RedisStore) Update(ctx context.Context, id string, fn func(*Key) error) (*Key, error) {
	digestHex, err := s.digestOf(ctx, id)
	if err != nil {
		return nil, err
	}
	recKey := s.digestKey(digestHex)
	for attempt := range updateAttempts {
		if attempt > 0 {
			if err := backoff(ctx, attempt); err != nil {
				return nil, fmt.Errorf("keystore: redis update key: %w", err)
			}
		}
		var out *Key
		err := s.c.Watch(ctx, func(tx *redis.Tx) error {
			data, err := tx.Get(ctx, recKey).Bytes()
			if errors.Is(err, redis.Nil) {
				return ErrNotFound
			}
			if err != nil {
				return err
			}
			cur, err := decodeKey(data)
			if err != nil {
				return err
			}
			if cur.ID != id {
				return ErrNotFound
			}
			next, changed, err := applyUpdate(cur, fn)
			if err != nil {
				return err
			}
			out = next
			if !changed {
				return nil
			}
			record, err := encodeKey(next)
			if err != nil {
				return err
			}
			_, err = tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
				// XX: never resurrect a record that expired meanwhile. SET
				// without an expiry drops the old one, for a key whose end
				// was removed.
				p.SetArgs(ctx, recKey, record, expireArgs("XX", s.expireAt(next)))
				if !s.cluster() {
					// In the same transaction: a cache that sees the
					// version unchanged knows no record changed.
					p.Incr(ctx, s.versionKey())
				}
				return nil
			})
			if errors.Is(err, redis.Nil) {
				return ErrNotFound
			}
			return err
		}, recKey)
		if fnErr := fnErrorOf(err); fnErr != nil {
			return nil, fnErr
		}
		switch {
		case errors.Is(err, redis.TxFailedErr):
			continue // the record changed under us: read it again
		case errors.Is(err, ErrNotFound), errors.Is(err, ErrConflict):
			return nil, err
		case err != nil:
			return nil, fmt.Errorf("keystore: redis update key: %w", err)
		}
		// Also when nothing changed: a retried Update repairs the expiry
		// of the id and used keys if an earlier attempt failed to set it.
		if out.LastUsedAt, err = s.syncExpiry(ctx, out, recKey); err != nil {
			return nil, fmt.Errorf("keystore: redis update key (expiry): %w", err)
		}
		return out, nil
	}
	return nil, errors.New("keystore: redis update key: too much contention, try again")
}

// backoff sleeps for a random time of up to updateMaxBackoff, growing with
// attempt, or until ctx ends.
func backoff(ctx context.Context, attempt int) error {
	limit := min(time.Duration(1)<<min(attempt, 30)*time.Millisecond/2, updateMaxBackoff)
	t := time.NewTimer(time.Duration(rand.Int64N(int64(limit)) + 1))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// syncAttempts bounds the rounds of syncExpiry. Only concurrent Updates of
// the same key that keep moving its end make it go round again; between
// rounds it backs off like Update.
const syncAttempts = 32

// syncExpiry gives the id and used keys of key k the expiry (s.expireAt)
// that its record at recKey was written with, and its member in the live
// index the end, and returns the key's last-use time.
//
// The record and its expiry change together in one transaction, but the id
// and used keys live in other slots and follow in separate commands, so two
// concurrent Updates could apply their expiries there in the opposite order
// to their record writes. So after applying it, syncExpiry reads the record
// again and, if that calls for another expiry, applies that one. The last
// expiry applied is then always followed by a read of the latest record
// that agrees with it. Both the expiry and the live index follow the key's
// end, so the same holds for the live index.
func (s *RedisStore) syncExpiry(ctx context.Context, k *Key, recKey string) (*time.Time, error) {
	id, owner := k.ID, k.Owner
	idKey, usedKey, liveKey := s.idKey(id), s.usedKey(id), s.liveKey(owner)
	expireAt, score := s.expireAt(k), liveScore(k)
	for round := range syncAttempts {
		if round > 0 {
			if err := backoff(ctx, round); err != nil {
				return nil, err
			}
		}
		cmds, _ := s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, key := range []string{idKey, usedKey} {
				if expireAt > 0 {
					p.PExpireAt(ctx, key, time.UnixMilli(expireAt))
				} else {
					p.Persist(ctx, key)
				}
			}
			p.Do(ctx, "ZADD", liveKey, score, id)
			return nil
		})
		for _, cmd := range cmds {
			if err := cmd.Err(); err != nil {
				return nil, err
			}
		}

		var (
			recCmd  *redis.StringCmd
			usedCmd usedCmds
		)
		_, _ = s.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			recCmd = p.Get(ctx, recKey)
			usedCmd = s.queueUsed(ctx, p, id)
			return nil
		})
		lastUsed, err := usedCmd.time()
		if err != nil {
			return nil, err
		}
		data, err := recCmd.Bytes()
		if errors.Is(err, redis.Nil) {
			return lastUsed, nil // deleted by retention meanwhile
		}
		if err != nil {
			return nil, err
		}
		latest, err := decodeKey(data)
		if err != nil {
			return nil, err
		}
		want := s.expireAt(latest)
		if latest.ID != id || want == expireAt {
			return lastUsed, nil
		}
		// another Update moved the end: follow it
		expireAt, score = want, liveScore(latest)
	}
	return nil, errors.New("too much contention, try again")
}

// CountOwner implements [Store.CountOwner] with ZCARD of the owner index,
// which also counts interrupted Creates and keys deleted by retention until
// a List prunes them (see [Store.CountOwner]).
func (s *RedisStore) CountOwner(ctx context.Context, owner string) (int, error) {
	n, err := s.c.ZCard(ctx, s.ownerKey(owner)).Result()
	if err != nil {
		return 0, fmt.Errorf("keystore: redis count keys: %w", err)
	}
	return int(n), nil
}

// Idempotency records are stored as "<token>\n<json>" so that the scripts
// below can compare the token without decoding JSON.

// replaceIdemScript sets KEYS[1] to ARGV[2] with a TTL of ARGV[3] ms if the
// stored token equals ARGV[1]. It returns 1 on success, 0 otherwise.
var replaceIdemScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local nl = string.find(v, '\n', 1, true)
if not nl or string.sub(v, 1, nl - 1) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
`)

// deleteIdemScript deletes KEYS[1] if the stored token equals ARGV[1]. It
// returns 1 if it deleted the record, 0 otherwise.
var deleteIdemScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local nl = string.find(v, '\n', 1, true)
if not nl or string.sub(v, 1, nl - 1) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
`)

// encodeIdem returns the stored form of rec.
func encodeIdem(rec *IdempotencyRecord) (string, error) {
	data, err := json.Marshal(rec)
	if err != nil {
		return "", fmt.Errorf("keystore: encode idempotency record: %w", err)
	}
	return rec.Token + "\n" + string(data), nil
}

// decodeIdem parses the stored form of an idempotency record.
func decodeIdem(v string) (*IdempotencyRecord, error) {
	_, data, ok := strings.Cut(v, "\n")
	if !ok {
		return nil, errors.New("keystore: decode idempotency record: missing token separator")
	}
	var rec IdempotencyRecord
	if err := json.Unmarshal([]byte(data), &rec); err != nil {
		return nil, fmt.Errorf("keystore: decode idempotency record: %w", err)
	}
	return &rec, nil
}

// reserveAttempts bounds the retries of ReserveIdempotency when the record
// it collided with expires before it could be read.
const reserveAttempts = 8

// ReserveIdempotency implements [Store.ReserveIdempotency] with SET NX PX.
func (s *RedisStore) ReserveIdempotency(ctx context.Context, id string, rec *IdempotencyRecord, ttl time.Duration) (*IdempotencyRecord, error) {
	if err := validateIdempotency(id, rec, ttl); err != nil {
		return nil, err
	}
	value, err := encodeIdem(rec)
	if err != nil {
		return nil, err
	}
	key := s.idemKey(id)
	for range reserveAttempts {
		ok, err := s.c.SetArgs(ctx, key, value, redis.SetArgs{Mode: "NX", TTL: ttl}).Result()
		if err == nil && ok == "OK" {
			return nil, nil
		}
		if err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("keystore: redis reserve idempotency record: %w", err)
		}
		existing, err := s.GetIdempotency(ctx, id)
		if errors.Is(err, ErrNotFound) {
			continue // expired in between: try to reserve again
		}
		return existing, err
	}
	return nil, errors.New("keystore: redis reserve idempotency record: too much contention, try again")
}

// GetIdempotency implements [Store.GetIdempotency].
func (s *RedisStore) GetIdempotency(ctx context.Context, id string) (*IdempotencyRecord, error) {
	if id == "" {
		return nil, ErrNotFound
	}
	v, err := s.c.Get(ctx, s.idemKey(id)).Result()
	if errors.Is(err, redis.Nil) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: redis get idempotency record: %w", err)
	}
	return decodeIdem(v)
}

// ReplaceIdempotency implements [Store.ReplaceIdempotency] with a
// single-key compare-and-set script.
func (s *RedisStore) ReplaceIdempotency(ctx context.Context, id, token string, rec *IdempotencyRecord, ttl time.Duration) error {
	if err := validateIdempotency(id, rec, ttl); err != nil {
		return err
	}
	value, err := encodeIdem(rec)
	if err != nil {
		return err
	}
	n, err := replaceIdemScript.Run(ctx, s.c, []string{s.idemKey(id)}, token, value, ttl.Milliseconds()).Int()
	if err != nil {
		return fmt.Errorf("keystore: redis replace idempotency record: %w", err)
	}
	if n != 1 {
		return ErrConflict
	}
	return nil
}

// DeleteIdempotency implements [Store.DeleteIdempotency] with a single-key
// compare-and-delete script.
func (s *RedisStore) DeleteIdempotency(ctx context.Context, id, token string) error {
	if id == "" {
		return nil
	}
	if err := deleteIdemScript.Run(ctx, s.c, []string{s.idemKey(id)}, token).Err(); err != nil {
		return fmt.Errorf("keystore: redis delete idempotency record: %w", err)
	}
	return nil
}

// Ping implements [Store.Ping]. On a cluster it checks every known node.
func (s *RedisStore) Ping(ctx context.Context) error {
	if cc, ok := s.c.(*redis.ClusterClient); ok {
		if err := cc.ForEachShard(ctx, func(ctx context.Context, c *redis.Client) error {
			return c.Ping(ctx).Err()
		}); err != nil {
			return fmt.Errorf("keystore: redis ping: %w", err)
		}
		return nil
	}
	if err := s.c.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("keystore: redis ping: %w", err)
	}
	return nil
}

// Close implements [Store.Close]. It closes the client if [NewRedis] created
// it, and does nothing for a client passed to [NewRedisFromClient].
func (s *RedisStore) Close() error {
	if !s.ownClient {
		return nil
	}
	if err := s.c.Close(); err != nil {
		return fmt.Errorf("keystore: redis close: %w", err)
	}
	return nil
}
