package keystore

// This file parses redis+sentinel:// URLs into go-redis failover options.

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// DefaultSentinelPort is the port of a Sentinel named without one in a
// redis+sentinel:// URL.
const DefaultSentinelPort = "26379"

// sentinelScheme starts a Sentinel URL.
const sentinelScheme = "redis+sentinel://"

// hasSentinelURL reports whether any of urls is a Sentinel URL.
func hasSentinelURL(urls []string) bool {
	for _, u := range urls {
		if IsSentinelURL(u) {
			return true
		}
	}
	return false
}

// IsSentinelURL reports whether raw is a redis+sentinel:// URL (or names a
// Sentinel scheme this package refuses, such as rediss+sentinel://).
func IsSentinelURL(raw string) bool {
	scheme, _, ok := strings.Cut(raw, "://")
	return ok && strings.HasSuffix(strings.ToLower(scheme), "+sentinel")
}

// sentinelParts are the parts of a redis+sentinel:// URL.
type sentinelParts struct {
	userinfo string // before the last "@" of the authority; "" if none
	hosts    string // the comma-separated Sentinel addresses
	path     string // <master-name>[/db]
	rawQuery string
}

// splitSentinelURL splits a redis+sentinel:// URL as parseSentinelURLs
// reads it (and so as RedisURLHasPassword does): query at the first "?",
// path at the first "/" before it, user info up to the last "@" of the
// authority.
func splitSentinelURL(raw string) (sentinelParts, error) {
	if !strings.HasPrefix(strings.ToLower(raw), sentinelScheme) {
		return sentinelParts{}, errors.New("keystore: redis Sentinel URL: only redis+sentinel:// is supported (TLS to Sentinel is not supported yet)")
	}
	var p sentinelParts
	rest := raw[len(sentinelScheme):]
	rest, p.rawQuery, _ = strings.Cut(rest, "?")
	authority, path, _ := strings.Cut(rest, "/")
	p.path, p.hosts = path, authority
	if i := strings.LastIndex(authority, "@"); i >= 0 {
		p.userinfo, p.hosts = authority[:i], authority[i+1:]
	}
	return p, nil
}

// RedisURLHasPassword reports whether raw, one URL as [RedisOptions.URLs]
// takes it, carries a password: in its user info (redis://, rediss://,
// redis+sentinel://) or as sentinel_password. It reads raw exactly as
// [ParseRedisOptions] does, so a configuration check built on it cannot
// disagree with the client about where the password is. A URL that
// ParseRedisOptions would refuse for its shape gives an error (which
// never contains a password).
func RedisURLHasPassword(raw string) (bool, error) {
	if IsSentinelURL(raw) {
		sp, err := splitSentinelURL(raw)
		if err != nil {
			return false, err
		}
		q, err := url.ParseQuery(sp.rawQuery)
		if err != nil {
			return false, fmt.Errorf("keystore: redis URL %s: bad query", sentinelScheme+sp.hosts+"/"+sp.path)
		}
		if q.Has("sentinel_password") {
			return true, nil
		}
		if sp.userinfo == "" {
			return false, nil
		}
		// parseSentinelURLs hands the user info on in a redis:// URL.
		raw = "redis://" + sp.userinfo + "@127.0.0.1"
	}
	u, err := url.Parse(raw)
	if err != nil {
		return false, errors.New("keystore: redis URL is not a valid URL (not shown: it may contain a password)")
	}
	if u.Scheme != "redis" && u.Scheme != "rediss" {
		return false, fmt.Errorf("keystore: redis URL %s: scheme must be redis:// or rediss://", u.Redacted())
	}
	_, has := u.User.Password()
	return has, nil
}

// parseSentinelURLs parses the one redis+sentinel:// URL of urls. Errors
// never contain the URL's credentials.
func parseSentinelURLs(urls []string) (*redis.UniversalOptions, error) {
	if len(urls) != 1 {
		return nil, errors.New("keystore: a redis+sentinel:// URL must be the only Redis URL; list several Sentinels inside it, separated by commas")
	}
	sp, err := splitSentinelURL(urls[0])
	if err != nil {
		return nil, err
	}
	userinfo, hosts, path, rawQuery := sp.userinfo, sp.hosts, sp.path, sp.rawQuery
	redacted := sentinelScheme + hosts + "/" + path

	var addrs []string
	for _, h := range strings.Split(hosts, ",") {
		if h == "" {
			return nil, fmt.Errorf("keystore: redis URL %s: empty Sentinel address", redacted)
		}
		host, port, err := net.SplitHostPort(h)
		if err != nil {
			host, port = h, DefaultSentinelPort
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || host == "" || strings.ContainsAny(host, "[]@/") {
			return nil, fmt.Errorf("keystore: redis URL %s: bad Sentinel address %q", redacted, h)
		}
		addrs = append(addrs, net.JoinHostPort(host, port))
	}

	segs := strings.Split(path, "/")
	if len(segs) > 2 || segs[0] == "" {
		return nil, fmt.Errorf("keystore: redis URL %s: want redis+sentinel://host:port[,host:port...]/<master-name>[/db]", redacted)
	}
	master, err := url.PathUnescape(segs[0])
	if err != nil || master == "" {
		return nil, fmt.Errorf("keystore: redis URL %s: bad master name", redacted)
	}
	db := "0"
	if len(segs) == 2 {
		db = segs[1]
	}

	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return nil, fmt.Errorf("keystore: redis URL %s: bad query", redacted)
	}
	sentinelUser, sentinelPass := q.Get("sentinel_username"), q.Get("sentinel_password")
	q.Del("sentinel_username")
	q.Del("sentinel_password")

	// Everything else means what it means in a redis:// URL: let go-redis
	// read it from the equivalent URL of the first Sentinel.
	equiv := "redis://"
	if userinfo != "" {
		equiv += userinfo + "@"
	}
	equiv += addrs[0] + "/" + db
	if len(q) > 0 {
		equiv += "?" + q.Encode()
	}
	u, o, err := parseRedisURL(0, equiv)
	if err != nil {
		// Name the Sentinel URL, not its redis:// equivalent.
		if cause := errors.Unwrap(err); cause != nil {
			return nil, fmt.Errorf("keystore: redis URL %s: %w", redacted, cause)
		}
		return nil, fmt.Errorf("keystore: redis URL %s is not valid (details not shown: they may contain a password)", redacted)
	}
	uo := universalFromOptions(o)
	uo.Addrs = addrs
	uo.MasterName = master
	uo.SentinelUsername, uo.SentinelPassword = sentinelUser, sentinelPass
	uo.MaxRetries = DefaultRedisMaxRetries
	if u.Query().Has("max_retries") {
		uo.MaxRetries = o.MaxRetries
	}
	return uo, nil
}
