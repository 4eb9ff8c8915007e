package apikeys

// This file holds the module's Prometheus metrics, served by Caddy's own
// metrics endpoints (the admin API's /metrics, or a `metrics` handler).
//
// The collectors are package-level, so counts accumulate for the life of
// the process whatever the number of handlers and config reloads; each
// config's registry (caddy.Context.GetMetricsRegistry, new on every load)
// gets them registered once.

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

const metricsNamespace = "caddy_apikeys"

var (
	metricValidations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "validations_total",
		Help: "Guarded requests by outcome: accepted, no_key, malformed, unknown, revoked, expired, disabled, insufficient_scope, rate_limited, quota_exceeded (refused by the key's plan), store_unavailable, bad_request (a non-canonical path, on the management API too, or a forbidden trailer).",
	}, []string{"result"})
	metricCacheLookups = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "cache_lookups_total",
		Help: "Key cache lookups by outcome: hit, stale (served while re-read in the background), negative_hit (remembered unknown), miss (read from the store), outage (served past ttl while the store is unreachable), unavailable, bypass (cache off).",
	}, []string{"result"})
	metricStoreDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: metricsNamespace, Name: "store_duration_seconds",
		Help:    "Duration of key store calls by operation (by_digest: one key; by_digests: a background refresh batch; publish: an invalidation).",
		Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
	}, []string{"op"})
	metricStoreErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "store_errors_total",
		Help: "Key store calls that failed (not counting not-found and conflict answers), by operation.",
	}, []string{"op"})
	metricStoreOutages = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "store_outages_total",
		Help: "Times the key store was marked unreachable.",
	})
	metricInvalidations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "cache_invalidations_total",
		Help: "Key cache invalidations by source: local (a write through this instance), remote (a pub/sub message), flush (the whole cache, on (re)subscribe).",
	}, []string{"source"})
	metricKeysMinted = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "keys_minted_total",
		Help: "API keys created.",
	})
	metricKeysRevoked = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "keys_revoked_total",
		Help: "API keys revoked.",
	})
	metricIdempotentReplays = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: metricsNamespace, Name: "idempotent_replays_total",
		Help: "Create requests answered from a stored Idempotency-Key result.",
	})

	allMetrics = []prometheus.Collector{
		metricValidations, metricCacheLookups, metricStoreDuration, metricStoreErrors,
		metricStoreOutages, metricInvalidations, metricKeysMinted, metricKeysRevoked,
		metricIdempotentReplays,
	}
)

// Validation results, resolved once: the guard counts every request.
var (
	validationAccepted          = metricValidations.WithLabelValues("accepted")
	validationNoKey             = metricValidations.WithLabelValues("no_key")
	validationMalformed         = metricValidations.WithLabelValues("malformed")
	validationUnknown           = metricValidations.WithLabelValues("unknown")
	validationRevoked           = metricValidations.WithLabelValues("revoked")
	validationExpired           = metricValidations.WithLabelValues("expired")
	validationDisabled          = metricValidations.WithLabelValues("disabled")
	validationInsufficientScope = metricValidations.WithLabelValues("insufficient_scope")
	validationRateLimited       = metricValidations.WithLabelValues("rate_limited")
	validationQuotaExceeded     = metricValidations.WithLabelValues("quota_exceeded")
	validationStoreUnavailable  = metricValidations.WithLabelValues("store_unavailable")
	validationBadRequest        = metricValidations.WithLabelValues("bad_request")
)

// cacheLookupCounters holds one counter per keystore.LookupResult.
var cacheLookupCounters = func() map[keystore.LookupResult]prometheus.Counter {
	m := map[keystore.LookupResult]prometheus.Counter{}
	for _, r := range []keystore.LookupResult{
		keystore.LookupHit, keystore.LookupStale, keystore.LookupNegativeHit, keystore.LookupMiss,
		keystore.LookupOutage, keystore.LookupUnavailable, keystore.LookupBypass,
	} {
		m[r] = metricCacheLookups.WithLabelValues(string(r))
	}
	return m
}()

// Hot-path shortcuts into cacheLookupCounters.
var (
	cacheHit   = cacheLookupCounters[keystore.LookupHit]
	cacheStale = cacheLookupCounters[keystore.LookupStale]
)

// registerMetrics registers the module's collectors in reg; registering
// them again in the same registry (several handlers, one config) is fine.
func registerMetrics(reg *prometheus.Registry) error {
	for _, c := range allMetrics {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) && are.ExistingCollector == c {
				continue
			}
			return err
		}
	}
	return nil
}

// storeObserver receives what the cached store does (keystore.CacheObserver):
// it counts it and logs what an operator must know.
type storeObserver struct {
	logger *zap.Logger
}

func newStoreObserver(logger *zap.Logger) *storeObserver {
	return &storeObserver{logger: logger}
}

func (o *storeObserver) CacheLookup(r keystore.LookupResult) {
	switch r {
	case keystore.LookupHit:
		cacheHit.Inc()
	case keystore.LookupStale:
		cacheStale.Inc()
	default:
		if c := cacheLookupCounters[r]; c != nil {
			c.Inc()
		}
	}
}

func (o *storeObserver) StoreCall(op string, took time.Duration, err error) {
	metricStoreDuration.WithLabelValues(op).Observe(took.Seconds())
	if !keystore.Outcome(err) {
		metricStoreErrors.WithLabelValues(op).Inc()
	}
}

func (o *storeObserver) Invalidated(source string) { metricInvalidations.WithLabelValues(source).Inc() }
func (o *storeObserver) KeyMinted()                { metricKeysMinted.Inc() }
func (o *storeObserver) KeyRevoked()               { metricKeysRevoked.Inc() }

func (o *storeObserver) StoreHealth(up bool, err error) {
	if up {
		o.logger.Info("key store reachable again")
		return
	}
	metricStoreOutages.Inc()
	o.logger.Warn("key store unreachable: keys validated recently keep working for the cache's outage_window; others get 503 until it answers", zap.Error(err))
}

func (o *storeObserver) Error(msg string, err error) {
	o.logger.Error(msg, zap.Error(err))
}

var _ keystore.CacheObserver = (*storeObserver)(nil)
