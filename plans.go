package apikeys

// This file holds plans: their configuration and Caddyfile syntax, their
// compiled form (a ratelimit.Policy and the fields of the IETF httpapi
// rate-limit-headers draft), and the plan checks of the management API.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
	"github.com/caddy-apikeys/caddy-apikeys/ratelimit"
)

// Plan is a named set of limits that keys are assigned (`plan` on create,
// PATCH and rotate; DefaultPlan otherwise). A plan without RateLimit and
// Quota limits nothing but still names the key's tier to the backend.
type Plan struct {
	// Name identifies the plan in the API and in the X-Api-Key-Plan
	// header: letters, digits and . _ : - (not first), at most 64
	// characters. Required, unique.
	Name string `json:"name"`
	// RateLimit limits the rate of a key's requests. Default: none.
	RateLimit *RateLimit `json:"rate_limit,omitempty"`
	// Quota caps a key's accepted requests per UTC day or calendar month.
	// Default: none.
	Quota *Quota `json:"quota,omitempty"`
}

// RateLimit admits a burst of at most Requests, then Requests per Window
// (GCRA, see package ratelimit).
type RateLimit struct {
	// Requests is the burst size and the number of requests per Window;
	// from 1 to 999,999,999,999,999.
	Requests int64 `json:"requests"`
	// Window is the rate limit's window; from 1s to 24h, and at least
	// 1µs per request.
	Window caddy.Duration `json:"window"`
}

// Quota caps the accepted requests of a key (and of the keys that replaced
// it in rotations) per period.
type Quota struct {
	// Requests is the number of accepted requests per Period; from 1 to
	// 999,999,999,999,999.
	Requests int64 `json:"requests"`
	// Period is "day" (a UTC day) or "month" (a calendar month in UTC).
	Period string `json:"period"`
}

// Names of the policies in the RateLimit-Policy and RateLimit fields.
const (
	policyRate  = "rate"
	policyQuota = "quota"
)

// compiledPlan is a Plan ready for the guard.
type compiledPlan struct {
	policy      ratelimit.Policy
	value       any    // policy.Name boxed once, for the placeholder
	limited     bool   // it has a rate limit or a quota
	policyField string // the RateLimit-Policy field value; "" when not limited
}

// maxPlanNumber is the largest rate limit or quota a plan may have: the
// RateLimit-Policy and RateLimit fields are Structured Fields (RFC 9651
// §3.3.1), whose integers have at most 15 digits, and the shared limiter's
// Lua scripts count in doubles, exact to 2^53.
const maxPlanNumber = 999_999_999_999_999

// compilePlans validates Plans and DefaultPlan and builds h.plans.
func (h *Handler) compilePlans() error {
	h.plans = nil
	h.limited = false
	if len(h.Plans) > 0 {
		h.plans = make(map[string]*compiledPlan, len(h.Plans))
	}
	for i, p := range h.Plans {
		if !validPlanName(p.Name) {
			return fmt.Errorf("apikeys: plan %d: %q is not a valid plan name (letters, digits and . _ : -, at most %d characters)", i+1, p.Name, maxPlanLen)
		}
		if _, dup := h.plans[p.Name]; dup {
			return fmt.Errorf("apikeys: plan %q is defined twice", p.Name)
		}
		cp := &compiledPlan{policy: ratelimit.Policy{Name: p.Name}, value: p.Name}
		var fields []string
		if rl := p.RateLimit; rl != nil {
			if rl.Requests < 1 || rl.Requests > maxPlanNumber {
				return fmt.Errorf("apikeys: plan %q: rate_limit requests must be from 1 to %d, got %d", p.Name, maxPlanNumber, rl.Requests)
			}
			if time.Duration(rl.Window) < time.Second {
				return fmt.Errorf("apikeys: plan %q: rate_limit window must be at least 1s, got %s", p.Name, time.Duration(rl.Window))
			}
			cp.policy.Limit, cp.policy.Window = rl.Requests, time.Duration(rl.Window)
			fields = append(fields, fmt.Sprintf("%q;q=%d;w=%d", policyRate, rl.Requests, ceilSeconds(cp.policy.Window)))
		}
		if q := p.Quota; q != nil {
			if q.Requests < 1 || q.Requests > maxPlanNumber {
				return fmt.Errorf("apikeys: plan %q: quota requests must be from 1 to %d, got %d", p.Name, maxPlanNumber, q.Requests)
			}
			switch q.Period {
			case "day":
				cp.policy.Period = ratelimit.Day
				// A UTC day is 86400 s (the limiter counts UTC days).
				fields = append(fields, fmt.Sprintf("%q;q=%d;w=86400", policyQuota, q.Requests))
			case "month":
				// A calendar month has no fixed length: no window.
				cp.policy.Period = ratelimit.Month
				fields = append(fields, fmt.Sprintf("%q;q=%d", policyQuota, q.Requests))
			default:
				return fmt.Errorf("apikeys: plan %q: quota period must be day or month, got %q", p.Name, q.Period)
			}
			cp.policy.Quota = q.Requests
		}
		if err := cp.policy.Validate(); err != nil {
			return fmt.Errorf("apikeys: %s", strings.TrimPrefix(err.Error(), "ratelimit: "))
		}
		cp.limited = len(fields) > 0
		cp.policyField = strings.Join(fields, ", ")
		h.limited = h.limited || cp.limited
		h.plans[p.Name] = cp
	}
	if h.DefaultPlan != "" {
		if _, ok := h.plans[h.DefaultPlan]; !ok {
			return fmt.Errorf("apikeys: default_plan %q is not a configured plan (have %s)", h.DefaultPlan, h.planNames())
		}
	}
	return nil
}

// planNames lists the configured plans for messages.
func (h *Handler) planNames() string {
	if len(h.Plans) == 0 {
		return "none"
	}
	names := make([]string, len(h.Plans))
	for i, p := range h.Plans {
		names[i] = p.Name
	}
	return strings.Join(names, ", ")
}

// maxPlanLen is the longest plan name.
const maxPlanLen = 64

// validPlanName reports whether s is a well-formed plan name. Plan names
// travel in a header and in RateLimit fields, so they are kept to a
// narrow character set.
func validPlanName(s string) bool {
	if s == "" || len(s) > maxPlanLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == ':' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// planFor returns the plan whose limits apply to a key with plan name
// name: that plan; DefaultPlan's for a name no longer configured (a plan
// removed from the config); nil for a key without a plan.
func (h *Handler) planFor(name string) *compiledPlan {
	if name == "" {
		return nil
	}
	if p, ok := h.plans[name]; ok {
		return p
	}
	if h.DefaultPlan != "" {
		return h.plans[h.DefaultPlan]
	}
	return nil
}

// ceilSeconds is d in whole seconds, rounded up.
func ceilSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

// refuseLimited answers a request that the limiter refused: 429
// rate_limited or quota_exceeded, with Retry-After and the RateLimit-Policy
// and RateLimit fields of draft-ietf-httpapi-ratelimit-headers-11.
func (h *Handler) refuseLimited(w http.ResponseWriter, p *compiledPlan, d ratelimit.Decision) error {
	retry := max(ceilSeconds(d.RetryAfter), 1)
	hdr := w.Header()
	hdr.Set("Retry-After", strconv.FormatInt(retry, 10))
	hdr.Set("RateLimit-Policy", p.policyField)
	hdr.Set("RateLimit", rateLimitField(&p.policy, d, retry))
	if d.Result == ratelimit.QuotaExceeded {
		validationQuotaExceeded.Inc()
		return writeError(w, &apiError{status: http.StatusTooManyRequests, code: "quota_exceeded",
			message: fmt.Sprintf("This API key has used its quota of %d requests this %s; it resets in %d seconds.", p.policy.Quota, p.policy.Period, retry)})
	}
	validationRateLimited.Inc()
	return writeError(w, &apiError{status: http.StatusTooManyRequests, code: "rate_limited",
		message: fmt.Sprintf("This API key is over its rate limit of %d requests per %s; retry in %d seconds.", p.policy.Limit, p.policy.Window, retry)})
}

// rateLimitField is the RateLimit field value for decision d under p:
// one item per limit of p, with r the requests available now and t the
// seconds until then (for the limit that refused, the Retry-After value,
// so that Retry-After never points before the end of that window).
func rateLimitField(p *ratelimit.Policy, d ratelimit.Decision, retry int64) string {
	var b strings.Builder
	if p.Limit > 0 {
		t := ceilSeconds(d.RateReset)
		if d.Result == ratelimit.RateLimited {
			t = retry
		}
		fmt.Fprintf(&b, "%q;r=%d;t=%d", policyRate, max(d.RateRemaining, 0), t)
	}
	if p.Quota > 0 {
		if b.Len() > 0 {
			b.WriteString(", ")
		}
		t := ceilSeconds(d.QuotaReset)
		if d.Result == ratelimit.QuotaExceeded {
			t = retry
		}
		fmt.Fprintf(&b, "%q;r=%d;t=%d", policyQuota, max(p.Quota-d.QuotaUsed, 0), t)
	}
	return b.String()
}

// parsePlan reads a `plan` member: a configured plan's name. null is
// reported as ok with an empty name.
func (h *Handler) parsePlan(raw []byte) (string, *apiError) {
	if isNull(raw) {
		return "", nil
	}
	var name string
	if raw[0] != '"' || json.Unmarshal(raw, &name) != nil {
		return "", validationError("plan", "`plan` must be the name of a plan, as a string.")
	}
	if _, ok := h.plans[name]; !ok {
		return "", &apiError{status: http.StatusBadRequest, code: "unknown_plan", field: "plan",
			message: fmt.Sprintf("Plan %s is not offered by this server (plans: %s).", strconv.Quote(truncate(name, 64)), h.planNames())}
	}
	return name, nil
}

// planGrantable checks that the session may give a key plan ("" for
// none) when dashboard_jwt names a plans_claim: the plan must be in the
// claim, or the claim must hold "*". DefaultPlan, which a key gets without
// asking, is always grantable; no plan (no limits) needs "*", as full
// access does under scopes_claim.
func (h *Handler) planGrantable(claims jwtauth.Claims, plan string) *apiError {
	if h.DashboardJWT == nil || h.DashboardJWT.PlansClaim == "" || slices.Contains(claims.Plans, "*") {
		return nil
	}
	if plan == "" {
		return &apiError{status: http.StatusForbidden, code: "plan_not_grantable", field: "plan",
			message: "Your session may not create keys without a plan; name one of the plans it may assign."}
	}
	if plan == h.DefaultPlan || slices.Contains(claims.Plans, plan) {
		return nil
	}
	return &apiError{status: http.StatusForbidden, code: "plan_not_grantable", field: "plan",
		message: fmt.Sprintf("Your session may not assign plan %q.", plan)}
}

// unmarshalPlan reads a `plan <name> { rate_limit <requests> <window>;
// quota <requests> day|month }` block.
func (h *Handler) unmarshalPlan(d *caddyfile.Dispenser) error {
	var p Plan
	if !d.NextArg() {
		return d.Err("plan needs a name: plan <name> { rate_limit <requests> <window>; quota <requests> day|month }")
	}
	p.Name = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	if !validPlanName(p.Name) {
		return d.Errf("plan: %q is not a valid plan name (letters, digits and . _ : -, at most %d characters)", p.Name, maxPlanLen)
	}
	for _, other := range h.Plans {
		if other.Name == p.Name {
			return d.Errf("plan %q is defined twice", p.Name)
		}
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "rate_limit":
			if p.RateLimit != nil {
				return d.Errf("plan %s: rate_limit may be given only once", p.Name)
			}
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("plan %s: rate_limit takes <requests> <window>, e.g. rate_limit 100 1m", p.Name)
			}
			n, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil || n < 1 {
				return d.Errf("plan %s: rate_limit requests: %q is not a positive whole number", p.Name, args[0])
			}
			win, err := caddy.ParseDuration(args[1])
			if err != nil || win < time.Second || win > ratelimit.MaxWindow {
				return d.Errf("plan %s: rate_limit window: %q is not a duration from 1s to %s (like 1m)", p.Name, args[1], ratelimit.MaxWindow)
			}
			p.RateLimit = &RateLimit{Requests: n, Window: caddy.Duration(win)}
		case "quota":
			if p.Quota != nil {
				return d.Errf("plan %s: quota may be given only once", p.Name)
			}
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("plan %s: quota takes <requests> day|month, e.g. quota 10000 month", p.Name)
			}
			n, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil || n < 1 {
				return d.Errf("plan %s: quota requests: %q is not a positive whole number", p.Name, args[0])
			}
			if args[1] != "day" && args[1] != "month" {
				return d.Errf("plan %s: quota period must be day or month, got %q", p.Name, args[1])
			}
			p.Quota = &Quota{Requests: n, Period: args[1]}
		default:
			return d.Errf("unrecognized plan option %q (want rate_limit or quota)", d.Val())
		}
	}
	h.Plans = append(h.Plans, p)
	return nil
}

// usageView is a key's quota use in the current period, as key views show
// it.
type usageView struct {
	Used     int64   `json:"used"`
	Limit    int64   `json:"limit"`
	Period   string  `json:"period"` // "day" or "month"
	ResetsAt apiTime `json:"resets_at"`
}

// keyView is newKeyView with the key's quota use, where its plan has a
// quota. A limiter that cannot answer (Redis unreachable) leaves usage
// out rather than failing the request.
func (h *Handler) keyView(ctx context.Context, k *keystore.Key, now time.Time) keyView {
	v := newKeyView(k, now)
	v.Usage = h.usageOf(ctx, k)
	return v
}

// usageOf returns k's quota use, or nil when no quota applies to it.
func (h *Handler) usageOf(ctx context.Context, k *keystore.Key) *usageView {
	p := h.planFor(k.Plan)
	if p == nil || p.policy.Quota == 0 || h.limiter == nil {
		return nil
	}
	u, err := h.limiter.Usage(ctx, k.MeterID(), &p.policy)
	if err != nil {
		if c := h.logger.Check(zapcore.WarnLevel, "reading a key's quota use failed"); c != nil {
			c.Write(zap.String("key_id", k.ID), zap.Error(err))
		}
		return nil
	}
	return &usageView{Used: u.Used, Limit: u.Limit, Period: u.Period.String(), ResetsAt: apiTime{u.ResetsAt.UTC()}}
}

// Bounds of the usage endpoint's `days`.
const (
	DefaultUsageDays = 30
	maxUsageDays     = ratelimit.HistoryDays
)

// usageResponse is the `data` of GET /v1/apikeys/{id}/usage.
type usageResponse struct {
	KeyID string     `json:"key_id"`
	Plan  string     `json:"plan,omitempty"`
	Usage *usageView `json:"usage,omitempty"`
	Days  []dayView  `json:"days"`
}

// dayView is one UTC day of a key's traffic.
type dayView struct {
	Date          string `json:"date"` // YYYY-MM-DD, UTC
	Accepted      int64  `json:"accepted"`
	RateLimited   int64  `json:"rate_limited"`
	QuotaExceeded int64  `json:"quota_exceeded"`
}

// serveUsage answers GET /v1/apikeys/{id}/usage?days=N (1 to 90, default
// 30): the key's daily counts of accepted, rate-limited and quota-refused
// requests, oldest first, today (UTC) last, days without traffic
// included. Counts are kept per meter, so they cover the key's rotation
// chain, and only while its plan limits something.
func (h *Handler) serveUsage(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims, id string) error {
	days := DefaultUsageDays
	if vals, ok := r.URL.Query()["days"]; ok {
		n, err := strconv.Atoi(vals[0])
		if err != nil || n < 1 || n > maxUsageDays || len(vals) > 1 {
			return writeError(w, validationError("days", fmt.Sprintf("`days` must be one whole number from 1 to %d.", maxUsageDays)))
		}
		days = n
	}
	ctx, cancel := h.storeCtx(r)
	defer cancel()
	k, aerr := h.ownedKey(ctx, claims.Owner, id)
	if aerr != nil {
		return writeError(w, aerr)
	}
	resp := usageResponse{KeyID: k.ID, Plan: k.Plan, Usage: h.usageOf(ctx, k), Days: make([]dayView, 0, days)}
	var hist []ratelimit.DayCount
	if h.limiter != nil {
		var err error
		if hist, err = h.limiter.History(ctx, k.MeterID(), days); err != nil {
			h.logger.Error("reading a key's daily counts failed", zap.String("key_id", k.ID), zap.Error(err))
			return writeError(w, errStoreUnavailable)
		}
	} else {
		// Nothing is metered on this server: every day is empty.
		today := h.now().UTC().Truncate(24 * time.Hour)
		for i := days - 1; i >= 0; i-- {
			hist = append(hist, ratelimit.DayCount{Day: today.AddDate(0, 0, -i)})
		}
	}
	for _, d := range hist {
		resp.Days = append(resp.Days, dayView{Date: d.Day.UTC().Format(time.DateOnly),
			Accepted: d.Accepted, RateLimited: d.RateLimited, QuotaExceeded: d.QuotaExceeded})
	}
	return writeData(w, http.StatusOK, resp)
}
