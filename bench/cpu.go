package main

// This file measures what the benchmark's -phases cpu measures: the CPU
// time the Caddy process spends per request, read from the kernel's
// accounting (utime+stime in /proc/<pid>/stat) around a fixed number of
// requests, every key used in turn (round-robin, so every key is active),
// bare Caddy and Caddy with apikeys alternated round by round. Throughput
// swings by 10-15% between rounds on a shared machine; CPU time per request
// does not depend on how much CPU the process was given, only on what it
// did with it. Also: the idle background CPU of each Caddy, its live heap
// after a forced GC, and the share of its CPU time the garbage collector
// took.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// clockTicks is the unit of utime and stime in /proc/<pid>/stat (USER_HZ).
var clockTicks = func() float64 {
	if out, err := exec.Command("getconf", "CLK_TCK").Output(); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil && n > 0 {
			return float64(n)
		}
	}
	return 100 // every Linux on x86 and arm64
}()

// procCPU returns the CPU time (user + system) that process pid has used.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	ut, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	return time.Duration((ut + st) / clockTicks * float64(time.Second)), nil
}

// memStats is what the benchmark reads of a Caddy's runtime.MemStats
// through its admin endpoint (/debug/vars).
type memStats struct {
	HeapAlloc     uint64  `json:"HeapAlloc"`
	HeapObjects   uint64  `json:"HeapObjects"`
	NumGC         uint32  `json:"NumGC"`
	GCCPUFraction float64 `json:"GCCPUFraction"`
}

// readMemStats reads c's memory statistics; with gc set it first has the
// process collect garbage (a heap profile with gc=1), so HeapAlloc is the
// live heap.
func readMemStats(c *config, gc bool) (memStats, time.Time, error) {
	var m memStats
	if gc {
		resp, err := http.Get("http://" + c.admin + "/debug/pprof/heap?gc=1")
		if err != nil {
			return m, time.Time{}, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	at := time.Now()
	resp, err := http.Get("http://" + c.admin + "/debug/vars")
	if err != nil {
		return m, at, err
	}
	defer resp.Body.Close()
	var vars struct {
		MemStats memStats `json:"memstats"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&vars); err != nil {
		return m, at, err
	}
	return vars.MemStats, at, nil
}

// gcCPU returns the CPU time the garbage collector has used since the
// process started, from GCCPUFraction (GC time over GOMAXPROCS x wall time
// since start; GOMAXPROCS is 1 when pinned).
func gcCPU(m memStats, at, started time.Time, procs int) time.Duration {
	return time.Duration(m.GCCPUFraction * float64(at.Sub(started)) * float64(procs))
}

// cpuResult is one CPU-time run of one configuration.
type cpuResult struct {
	Requests   int64         `json:"requests"`
	Errors     int64         `json:"errors"`
	CPU        time.Duration `json:"cpu_ns"`
	PerRequest time.Duration `json:"cpu_per_request_ns"`
	RPS        float64       `json:"rps"`
	P50        time.Duration `json:"p50_ns"`
	P99        time.Duration `json:"p99_ns"`
	RedisCmds  int64         `json:"redis_commands"`
	GCShare    float64       `json:"gc_share_of_cpu"`
	// Lookups counts the guard's cache lookups by result (hit, stale,
	// miss, ...), from caddy_apikeys_cache_lookups_total.
	Lookups map[string]float64 `json:"cache_lookups,omitempty"`
	RSS     uint64             `json:"rss_bytes_after"`
}

// cacheLookups reads c's caddy_apikeys_cache_lookups_total by result from
// its admin endpoint's /metrics (nil for bare Caddy).
func cacheLookups(c *config) map[string]float64 {
	resp, err := http.Get("http://" + c.admin + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out map[string]float64
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, `caddy_apikeys_cache_lookups_total{result="`)
		if !ok {
			continue
		}
		res, val, ok := strings.Cut(rest, `"} `)
		if v, err := strconv.ParseFloat(strings.TrimSpace(val), 64); ok && err == nil {
			if out == nil {
				out = map[string]float64{}
			}
			out[res] = v
		}
	}
	return out
}

// procRSS returns the resident set size of process pid (VmRSS).
func procRSS(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				kb, _ := strconv.ParseUint(f[0], 10, 64)
				return kb * 1024
			}
		}
	}
	return 0
}

// roundRobin sends n requests over conns connections, each taking the next
// key in turn (every key is used once every len(keys) requests), and
// returns throughput and latency.
func roundRobin(t *target, conns int, n int64, next *atomic.Int64) result {
	return roundRobinUntil(t, conns, n, time.Time{}, next)
}

// roundRobinUntil is roundRobin that also stops at deadline (unless zero).
func roundRobinUntil(t *target, conns int, n int64, deadline time.Time, next *atomic.Int64) result {
	var (
		wg       sync.WaitGroup
		requests atomic.Int64
		errs     atomic.Int64
		mu       sync.Mutex
		lats     []time.Duration
	)
	start := time.Now()
	for range conns {
		wg.Go(func() {
			c := &client{addr: t.addr}
			defer c.close()
			local := make([]time.Duration, 0, min(n/int64(conns)+1, 1<<16))
			for requests.Add(1) <= n && (deadline.IsZero() || time.Now().Before(deadline)) {
				i := next.Add(1) % int64(len(t.requests))
				t0 := time.Now()
				status, err := c.do(t.requests[i])
				local = append(local, time.Since(t0))
				if err != nil || status != 200 {
					errs.Add(1)
					if err != nil {
						time.Sleep(time.Millisecond)
					}
				}
			}
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	r := result{Requests: int64(len(lats)), Errors: errs.Load(), Duration: elapsed}
	r.RPS = float64(r.Requests) / elapsed.Seconds()
	r.setPercentiles(lats)
	return r
}

// roundRobinRate sends n requests, every key in turn, at rate requests a
// second on a fixed schedule over up to conns connections (open loop), so
// that every configuration serves the same request rate: a server's CPU
// time per request depends on how many requests each wake-up finds, so
// closed-loop runs at different throughputs are not like for like.
func roundRobinRate(t *target, conns int, n int64, rate float64, next *atomic.Int64) result {
	interval := time.Duration(float64(time.Second) / rate)
	jobs := make(chan time.Duration, conns*4)
	var (
		wg   sync.WaitGroup
		errs atomic.Int64
		mu   sync.Mutex
		lats []time.Duration
	)
	start := time.Now()
	for range conns {
		wg.Go(func() {
			c := &client{addr: t.addr}
			defer c.close()
			local := make([]time.Duration, 0, min(n/int64(conns)+1, 1<<16))
			for due := range jobs {
				i := next.Add(1) % int64(len(t.requests))
				status, err := c.do(t.requests[i])
				local = append(local, time.Since(start)-due)
				if err != nil || status != 200 {
					errs.Add(1)
				}
			}
			mu.Lock()
			lats = append(lats, local...)
			mu.Unlock()
		})
	}
	for i := range n {
		due := time.Duration(i) * interval
		if wait := due - time.Since(start); wait > 0 {
			time.Sleep(wait)
		}
		jobs <- due
	}
	close(jobs)
	wg.Wait()
	elapsed := time.Since(start)
	r := result{Requests: int64(len(lats)), Errors: errs.Load(), Duration: elapsed}
	r.RPS = float64(r.Requests) / elapsed.Seconds()
	r.setPercentiles(lats)
	return r
}

// measureCPU runs n round-robin requests against c and reads the Caddy
// process's CPU time, Redis's command count and the GC's CPU time around
// them.
func measureCPU(c *config, conns int, n int64, next *atomic.Int64, redisCmds func() int64) (cpuResult, error) {
	pid := c.cmd.Process.Pid
	m0, at0, err := readMemStats(c, false)
	if err != nil {
		return cpuResult{}, err
	}
	cmds0 := redisCmds()
	look0 := cacheLookups(c)
	cpu0, err := procCPU(pid)
	if err != nil {
		return cpuResult{}, err
	}
	var r result
	if *flagCPURate > 0 {
		r = roundRobinRate(c.target, max(conns, 64), n, *flagCPURate, next)
	} else {
		r = roundRobin(c.target, conns, n, next)
	}
	cpu1, err := procCPU(pid)
	if err != nil {
		return cpuResult{}, err
	}
	cmds1 := redisCmds()
	look1 := cacheLookups(c)
	m1, at1, err := readMemStats(c, false)
	if err != nil {
		return cpuResult{}, err
	}
	out := cpuResult{Requests: r.Requests, Errors: r.Errors, CPU: cpu1 - cpu0, RPS: r.RPS, P50: r.P50, P99: r.P99}
	out.PerRequest = out.CPU / time.Duration(max(r.Requests, 1))
	out.RSS = procRSS(pid)
	for res, v := range look1 {
		if out.Lookups == nil {
			out.Lookups = map[string]float64{}
		}
		out.Lookups[res] = v - look0[res]
	}
	if c.guarded {
		out.RedisCmds = cmds1 - cmds0
	}
	if out.CPU > 0 {
		gc := gcCPU(m1, at1, c.started, 1) - gcCPU(m0, at0, c.started, 1)
		out.GCShare = max(0, float64(gc)/float64(out.CPU))
	}
	return out, nil
}

// idleCPU returns the share of one core that c's Caddy uses over d with no
// requests.
func idleCPU(c *config, d time.Duration) (float64, error) {
	pid := c.cmd.Process.Pid
	cpu0, err := procCPU(pid)
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	time.Sleep(d)
	cpu1, err := procCPU(pid)
	if err != nil {
		return 0, err
	}
	return float64(cpu1-cpu0) / float64(time.Since(t0)), nil
}

// cpuSummary is one configuration's CPU-phase medians.
type cpuSummary struct {
	Name            string        `json:"name"`
	PerRequest      time.Duration `json:"cpu_per_request_median_ns"`
	PerRequestMin   time.Duration `json:"cpu_per_request_min_ns"`
	PerRequestMax   time.Duration `json:"cpu_per_request_max_ns"`
	AddedVsBare     time.Duration `json:"added_cpu_per_request_vs_bare_ns"`
	RatioVsBare     float64       `json:"cpu_ratio_vs_bare"`
	PairedRatio     float64       `json:"cpu_ratio_vs_bare_paired_median"`
	RPS             float64       `json:"rps_median"`
	P99             time.Duration `json:"p99_median_ns"`
	RedisPerRequest float64       `json:"redis_commands_per_request"`
	GCShare         float64       `json:"gc_share_of_cpu_median"`
	IdleCore        float64       `json:"idle_cpu_share_of_core"`
	IdleFirst       float64       `json:"idle_cpu_share_of_core_before_idle_window,omitempty"` // over -idle-after
	IdleProfile     string        `json:"idle_profile,omitempty"`
	LiveHeap        uint64        `json:"live_heap_bytes"`
	LiveObjects     uint64        `json:"live_heap_objects"`
	HeapPerKey      float64       `json:"live_heap_bytes_per_key_vs_bare"`
	HitRate         float64       `json:"cache_hit_rate,omitempty"` // hit and stale lookups over all, measured runs
	RSS             uint64        `json:"rss_bytes_max"`            // after a run, largest
	Errors          int64         `json:"errors"`
}

func summarizeCPU(runs map[string][]cpuResult, idle, idleFirst map[string]float64, heap map[string]memStats, keys int) []cpuSummary {
	var out []cpuSummary
	bare := runs["caddy"]
	bareMed := time.Duration(medianOf(durs(bare)))
	for _, name := range []string{"caddy", "apikeys", "apikeys-nocache"} {
		rs, ok := runs[name]
		if !ok {
			continue
		}
		d := durs(rs)
		s := cpuSummary{Name: name, PerRequest: time.Duration(medianOf(d)), IdleCore: idle[name], IdleFirst: idleFirst[name],
			LiveHeap: heap[name].HeapAlloc, LiveObjects: heap[name].HeapObjects}
		s.PerRequestMin, s.PerRequestMax = time.Duration(minF(d)), time.Duration(maxF(d))
		s.AddedVsBare = s.PerRequest - bareMed
		if bareMed > 0 {
			s.RatioVsBare = float64(s.PerRequest) / float64(bareMed)
		}
		var ratios, rps, p99, gc []float64
		var cmds, reqs int64
		var lookups, served float64
		for i, r := range rs {
			if i < len(bare) && bare[i].PerRequest > 0 {
				ratios = append(ratios, float64(r.PerRequest)/float64(bare[i].PerRequest))
			}
			rps, p99, gc = append(rps, r.RPS), append(p99, float64(r.P99)), append(gc, r.GCShare)
			cmds += r.RedisCmds
			reqs += r.Requests
			s.RSS = max(s.RSS, r.RSS)
			for res, v := range r.Lookups {
				lookups += v
				if res == "hit" || res == "stale" {
					served += v
				}
			}
			s.Errors += r.Errors
		}
		s.PairedRatio, s.RPS, s.P99, s.GCShare = medianOf(ratios), medianOf(rps), time.Duration(medianOf(p99)), medianOf(gc)
		if reqs > 0 {
			s.RedisPerRequest = float64(cmds) / float64(reqs)
		}
		if lookups > 0 {
			s.HitRate = served / lookups
		}
		if name != "caddy" && keys > 0 && heap[name].HeapAlloc > 0 {
			s.HeapPerKey = (float64(heap[name].HeapAlloc) - float64(heap["caddy"].HeapAlloc)) / float64(keys)
		}
		out = append(out, s)
	}
	return out
}

func durs(rs []cpuResult) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = float64(r.PerRequest)
	}
	return out
}

func minF(v []float64) float64 {
	m := 0.0
	for i, x := range v {
		if i == 0 || x < m {
			m = x
		}
	}
	return m
}

func maxF(v []float64) float64 {
	m := 0.0
	for i, x := range v {
		if i == 0 || x > m {
			m = x
		}
	}
	return m
}

// cpuMarkdown renders the CPU phase.
func (r *report) cpuMarkdown(b *strings.Builder) {
	if len(r.CPU) == 0 {
		return
	}
	load := fmt.Sprintf("closed loop over %d connections", r.CPUConns)
	if r.CPURate > 0 {
		load = fmt.Sprintf("open loop at %.0f requests/s", r.CPURate)
	}
	fmt.Fprintf(b, "\nCPU time per request: %d rounds (configurations alternated), %d requests per run, %s, every one of the %d keys used in turn (round-robin); "+
		"utime+stime of the Caddy process from /proc/<pid>/stat; idle: %s with no requests after the last round; live heap after a forced GC.\n\n",
		r.Rounds, r.CPURequests, load, r.Keys, r.IdleFor)
	if r.StoredKeys > r.Keys {
		fmt.Fprintf(b, "The store held %d keys in all; only those %d were used.\n\n", r.StoredKeys, r.Keys)
	}
	b.WriteString("| configuration | CPU/request, median (min-max) | added vs bare (medians) | ratio vs bare (medians; paired) | req/s | p99 | Redis cmds/request | GC share of CPU | idle CPU (share of a core) | live heap | heap per key vs bare | errors |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.CPU {
		redisCol, perKey := "-", "-"
		if s.Name != "caddy" {
			redisCol = fmt.Sprintf("%.4f", s.RedisPerRequest)
			perKey = fmt.Sprintf("%.0f B", s.HeapPerKey)
		}
		fmt.Fprintf(b, "| %s | %.1fus (%.1f-%.1f) | %+.1fus | %.3f; %.3f | %.0f | %s | %s | %.1f%% | %.2f%% | %.1f MB | %s | %d |\n",
			s.Name, usf(s.PerRequest), usf(s.PerRequestMin), usf(s.PerRequestMax), usf(s.AddedVsBare), s.RatioVsBare, s.PairedRatio,
			s.RPS, us(s.P99), redisCol, 100*s.GCShare, 100*s.IdleCore, float64(s.LiveHeap)/1e6, perKey, s.Errors)
	}
	b.WriteString("\nResident memory (VmRSS, largest after a run) and the guard's cache hit rate (hit and stale lookups over all, from caddy_apikeys_cache_lookups_total):")
	for _, s := range r.CPU {
		fmt.Fprintf(b, " %s %.1f MB", s.Name, float64(s.RSS)/1e6)
		if s.HitRate > 0 {
			fmt.Fprintf(b, ", hit rate %.4f", s.HitRate)
		}
		b.WriteString(";")
	}
	b.WriteString("\n")
	if r.IdleAfter != "" {
		fmt.Fprintf(b, "\nThe idle window started %s after the load stopped; over those first %s (which hold the last-used flush of the keys the load used):", r.IdleAfter, r.IdleAfter)
		for _, s := range r.CPU {
			fmt.Fprintf(b, " %s %.2f%%;", s.Name, 100*s.IdleFirst)
		}
		b.WriteString(" of a core.\n")
	}
}

func usf(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// cpuPhase measures CPU time per request of each Caddy configuration in
// alternated rounds, then idle CPU and live heap.
func cpuPhase(ctx context.Context, configs []*config, rdb *redis.Client) ([]cpuSummary, error) {
	redisCmds := func() int64 { return redisCommands(ctx, rdb) }
	var next atomic.Int64
	log.Printf("phase cpu: %d rounds of %d round-robin requests over %d connections, every key in turn", *flagRounds, *flagCPUReqs, *flagCPUConns)
	// Warm-up: every key once more through every configuration.
	for _, c := range configs {
		roundRobin(c.target, *flagCPUConns, int64(len(c.target.requests)), &next)
	}
	runs := map[string][]cpuResult{}
	for round := 1; round <= *flagRounds; round++ {
		for _, c := range configs {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			r, err := measureCPU(c, *flagCPUConns, *flagCPUReqs, &next, redisCmds)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", c.Name, err)
			}
			runs[c.Name] = append(runs[c.Name], r)
			log.Printf("  round %d %-16s %7.1fus CPU/request  %7.0f req/s  p99 %7v  redis cmds %d  GC %.1f%%  errors %d",
				round, c.Name, usf(r.PerRequest), r.RPS, r.P99.Round(time.Microsecond), r.RedisCmds, 100*r.GCShare, r.Errors)
		}
	}
	idle := map[string]float64{}
	heap := map[string]memStats{}
	for _, c := range configs {
		m, _, err := readMemStats(c, true)
		if err != nil {
			return nil, err
		}
		heap[c.Name] = m
	}
	// In parallel: the keys stay "in use" (used in the last 5 minutes)
	// for every configuration alike.
	idleAll := func(d time.Duration, into map[string]float64, what string) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, c := range configs {
			wg.Go(func() {
				v, err := idleCPU(c, d)
				if err != nil {
					log.Printf("idle CPU of %s: %v", c.Name, err)
				}
				mu.Lock()
				into[c.Name] = v
				mu.Unlock()
			})
		}
		wg.Wait()
		for _, c := range configs {
			log.Printf("  %s %-16s %.2f%% of a core over %v", what, c.Name, 100*into[c.Name], d)
		}
	}
	idleFirst := map[string]float64{}
	if *flagIdle > 0 && *flagIdleSkip > 0 {
		idleAll(*flagIdleSkip, idleFirst, "after load")
	}
	var profiles sync.WaitGroup
	if *flagIdle > 0 && *flagIdlePerf {
		// Over the idle window itself: the profiler costs next to nothing
		// in a process that does next to nothing (it samples CPU time).
		for _, c := range configs {
			profiles.Go(func() {
				if err := idleProfile(c, *flagIdle); err != nil {
					log.Printf("idle profile of %s: %v", c.Name, err)
				}
			})
		}
	}
	if *flagIdle > 0 {
		idleAll(*flagIdle, idle, "idle")
	}
	profiles.Wait()
	out := summarizeCPU(runs, idle, idleFirst, heap, *flagKeys)
	if *flagIdle > 0 && *flagIdlePerf {
		for i := range out {
			out[i].IdleProfile = out[i].Name + "-idle.pprof"
		}
	}
	return out, nil
}

// idleProfile fetches a CPU profile of c's Caddy over d with no requests,
// into <out>/<name>-idle.pprof.
func idleProfile(c *config, d time.Duration) error {
	if err := os.MkdirAll(*flagOut, 0o755); err != nil {
		return err
	}
	resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", c.admin, int(d.Seconds())))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("idle profile of %s: %s", c.Name, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(*flagOut, c.Name+"-idle.pprof"), b, 0o644)
}

// cpuTargets are the targets that the cpu phase measures.
func cpuTargets(cpu []cpuSummary) []check {
	var bare, guarded *cpuSummary
	for i := range cpu {
		switch cpu[i].Name {
		case "caddy":
			bare = &cpu[i]
		case "apikeys":
			guarded = &cpu[i]
		}
	}
	if bare == nil || guarded == nil {
		return nil
	}
	return []check{
		{"added CPU per proxied request <= 2% of bare Caddy's",
			fmt.Sprintf("%+.1fus = %+.1f%% (medians), %+.1f%% (median of per-round ratios)", usf(guarded.AddedVsBare), 100*(guarded.RatioVsBare-1), 100*(guarded.PairedRatio-1)),
			guarded.RatioVsBare <= 1.02 && guarded.PairedRatio <= 1.02},
		{"Redis commands per proxied request <= 0.01, every key active",
			fmt.Sprintf("%.4f", guarded.RedisPerRequest), guarded.RedisPerRequest <= 0.01},
		{"idle background CPU <= 0.5% of a core",
			fmt.Sprintf("%.2f%% (bare Caddy %.2f%%)", 100*guarded.IdleCore, 100*bare.IdleCore), guarded.IdleCore <= 0.005},
	}
}
