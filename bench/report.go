package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// report is what a benchmark run found, as written to results.json.
type report struct {
	Machine   string              `json:"machine"`
	Pinning   string              `json:"cpu_pinning,omitempty"`
	Command   string              `json:"command"`
	Date      string              `json:"date"`
	Elapsed   string              `json:"elapsed"`
	Rounds    int                 `json:"rounds"`
	Duration  string              `json:"run_duration"`
	Keys      int                 `json:"keys"`
	ZipfS     float64             `json:"zipf_s"`
	Conns     int                 `json:"closed_loop_connections"`
	OpenConns int                 `json:"open_loop_connections"`
	Rate      float64             `json:"open_loop_rate"`
	Configs   []summary           `json:"configs"`
	Peak      map[string][]result `json:"peak_runs"`
	Latency   map[string][]result `json:"latency_runs"`
	Targets   []check             `json:"targets"`

	CPU         []cpuSummary `json:"cpu,omitempty"`
	CPURequests int64        `json:"cpu_requests_per_run,omitempty"`
	CPUConns    int          `json:"cpu_connections,omitempty"`
	CPURate     float64      `json:"cpu_open_loop_rate,omitempty"`
	IdleFor     string       `json:"idle_measured_for,omitempty"`
	IdleAfter   string       `json:"idle_measured_after,omitempty"`
	StoredKeys  int          `json:"stored_keys,omitempty"` // when more than Keys
}

// summary is one configuration's medians over the rounds.
type summary struct {
	Name        string        `json:"name"`
	Label       string        `json:"label"`
	RPS         float64       `json:"peak_rps_median"`
	RPSMin      float64       `json:"peak_rps_min"`
	RPSMax      float64       `json:"peak_rps_max"`
	VsBare      float64       `json:"peak_vs_bare_caddy"`
	P50         time.Duration `json:"p50_median_ns"`
	P99         time.Duration `json:"p99_median_ns"`
	P99Min      time.Duration `json:"p99_min_ns"`
	P99Max      time.Duration `json:"p99_max_ns"`
	P999        time.Duration `json:"p999_median_ns"`
	P99Added    time.Duration `json:"p99_added_vs_bare_caddy_ns"`
	PairedRatio float64       `json:"peak_vs_bare_caddy_paired_median"`
	PairedP99   time.Duration `json:"p99_added_vs_bare_caddy_paired_median_ns"`
	RedisPeak   float64       `json:"redis_commands_per_request_peak"`
	RedisLoaded float64       `json:"redis_commands_per_request_open_loop"`
	Errors      int64         `json:"errors"`
}

// check is one of the targets.
type check struct {
	Target string `json:"target"`
	Got    string `json:"got"`
	Met    bool   `json:"met"`
}

func newReport(configs []*config, peak, lat map[string][]result, rate float64, elapsed time.Duration) *report {
	r := &report{
		Machine: machine(), Pinning: pinning(), Command: "go run ./bench " + strings.Join(os.Args[1:], " "),
		Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), Elapsed: elapsed.Round(time.Second).String(),
		Rounds: *flagRounds, Duration: flagDuration.String(), Keys: *flagKeys, StoredKeys: max(*flagStored, 0), ZipfS: zipfS,
		Conns: *flagConns, OpenConns: *flagOpenConn, Rate: rate, Peak: peak, Latency: lat,
	}
	r.Command = strings.TrimSpace(r.Command)
	perReq := func(x result) float64 {
		if x.Requests == 0 {
			return 0
		}
		return float64(x.RedisCmds) / float64(x.Requests)
	}
	for _, c := range configs {
		p, l := peak[c.Name], lat[c.Name]
		s := summary{Name: c.Name, Label: c.Label,
			RPS:    median(p, func(x result) float64 { return x.RPS }),
			RPSMin: minOf(p, func(x result) float64 { return x.RPS }),
			RPSMax: maxOf(p, func(x result) float64 { return x.RPS }),
			P50:    time.Duration(median(l, func(x result) float64 { return float64(x.P50) })),
			P99:    time.Duration(median(l, func(x result) float64 { return float64(x.P99) })),
			P99Min: time.Duration(minOf(l, func(x result) float64 { return float64(x.P99) })),
			P99Max: time.Duration(maxOf(l, func(x result) float64 { return float64(x.P99) })),
			P999:   time.Duration(median(l, func(x result) float64 { return float64(x.P999) })),
		}
		if c.guarded {
			s.RedisPeak = median(p, perReq)
			s.RedisLoaded = median(l, perReq)
		}
		for _, x := range append(append([]result{}, p...), l...) {
			s.Errors += x.Errors
		}
		r.Configs = append(r.Configs, s)
	}
	bare := r.config("caddy")
	for i := range r.Configs {
		s := &r.Configs[i]
		if bare.RPS == 0 {
			continue // no peak runs
		}
		s.VsBare = s.RPS / bare.RPS
		s.P99Added = s.P99 - bare.P99
		// Paired: each round's run against bare Caddy's run of the same
		// round, which saw about the same background load.
		var ratios, diffs []float64
		for j, x := range peak[s.Name] {
			if j < len(peak["caddy"]) && peak["caddy"][j].RPS > 0 {
				ratios = append(ratios, x.RPS/peak["caddy"][j].RPS)
			}
		}
		for j, x := range lat[s.Name] {
			if j < len(lat["caddy"]) {
				diffs = append(diffs, float64(x.P99-lat["caddy"][j].P99))
			}
		}
		s.PairedRatio = medianOf(ratios)
		s.PairedP99 = time.Duration(medianOf(diffs))
	}
	guarded := r.config("apikeys")
	if len(peak["caddy"]) == 0 {
		return r
	}
	r.Targets = []check{
		{"cached throughput >= 97% of bare Caddy",
			fmt.Sprintf("%.1f%% (ratio of medians), %.1f%% (median of per-round ratios)", 100*guarded.VsBare, 100*guarded.PairedRatio),
			guarded.VsBare >= 0.97 && guarded.PairedRatio >= 0.97},
		{"added p99 <= 100us at half of bare peak",
			fmt.Sprintf("%+dus (difference of medians), %+dus (median of per-round differences)", guarded.P99Added.Microseconds(), guarded.PairedP99.Microseconds()),
			guarded.P99Added <= 100*time.Microsecond && guarded.PairedP99 <= 100*time.Microsecond},
		{"Redis commands per proxied request <= 0.01", fmt.Sprintf("%.4f (peak runs), %.4f (open-loop runs)", guarded.RedisPeak, guarded.RedisLoaded),
			guarded.RedisPeak <= 0.01 && guarded.RedisLoaded <= 0.01},
	}
	return r
}

func pinning() string {
	if caddyCPU == "" {
		return "not pinned: Caddy, backend, Redis and load generator share every CPU"
	}
	return fmt.Sprintf("Caddy pinned to CPU %s with GOMAXPROCS=1; load generator, backend and Redis on the other CPUs", caddyCPU)
}

func (r *report) config(name string) summary {
	for _, s := range r.Configs {
		if s.Name == name {
			return s
		}
	}
	return summary{}
}

func medianOf(vals []float64) float64 {
	if len(vals) == 0 {
		return 0
	}
	vals = append([]float64(nil), vals...)
	slices.Sort(vals)
	if len(vals)%2 == 1 {
		return vals[len(vals)/2]
	}
	return (vals[len(vals)/2-1] + vals[len(vals)/2]) / 2
}

func minOf(rs []result, f func(result) float64) float64 {
	m := 0.0
	for i, x := range rs {
		if v := f(x); i == 0 || v < m {
			m = v
		}
	}
	return m
}

func maxOf(rs []result, f func(result) float64) float64 {
	m := 0.0
	for i, x := range rs {
		if v := f(x); i == 0 || v > m {
			m = v
		}
	}
	return m
}

func us(d time.Duration) string { return fmt.Sprintf("%dus", d.Microseconds()) }

// markdown renders the summary table and the targets.
func (r *report) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Machine: %s  \n", r.Machine)
	if r.Pinning != "" {
		fmt.Fprintf(&b, "CPUs: %s  \n", r.Pinning)
	}
	fmt.Fprintf(&b, "Command: `%s` (%s, took %s)  \n", r.Command, r.Date, r.Elapsed)
	fmt.Fprintf(&b, "%d rounds, configurations alternated within each round; %s runs; %d keys, Zipf s=%.1f; "+
		"peak: closed loop, %d connections; latency: open loop at %.0f req/s (half of bare Caddy's median peak), up to %d connections.\n\n",
		r.Rounds, r.Duration, r.Keys, r.ZipfS, r.Conns, r.Rate, r.OpenConns)
	if len(r.Peak["caddy"]) > 0 {
		b.WriteString("| configuration | peak req/s, median (min-max) | vs bare Caddy (medians; paired) | p50 | p99, median (min-max) | p99.9 | p99 vs bare Caddy (medians; paired) | Redis cmds/request (peak; open loop) | errors |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|\n")
		for _, s := range r.Configs {
			redisCol := "-"
			if s.Name == "apikeys" || s.Name == "apikeys-nocache" {
				redisCol = fmt.Sprintf("%.4f; %.4f", s.RedisPeak, s.RedisLoaded)
			}
			fmt.Fprintf(&b, "| %s | %.0f (%.0f-%.0f) | %.1f%%; %.1f%% | %s | %s (%s-%s) | %s | %+dus; %+dus | %s | %d |\n",
				s.Name, s.RPS, s.RPSMin, s.RPSMax, 100*s.VsBare, 100*s.PairedRatio, us(s.P50), us(s.P99), us(s.P99Min), us(s.P99Max), us(s.P999),
				s.P99Added.Microseconds(), s.PairedP99.Microseconds(), redisCol, s.Errors)
		}
	}
	r.cpuMarkdown(&b)
	b.WriteString("\n| target | measured | met |\n|---|---|---|\n")
	for _, c := range r.Targets {
		met := "no"
		if c.Met {
			met = "yes"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", c.Target, c.Got, met)
	}
	return b.String()
}

func (r *report) write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := writeJSON(filepath.Join(dir, "results.json"), r); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "summary.md"), []byte(r.markdown()), 0o644); err != nil {
		return err
	}
	return writeChart(filepath.Join(dir, "chart.png"), r)
}
