// Command bench is the load benchmark of caddy-apikeys: it compares a
// backend alone, Caddy's reverse_proxy in front of it, the same with the
// apikeys guard (10,000 keys, requests spread over them with a Zipf
// distribution), and the guard with its cache off. Run it from the
// repository root:
//
//	go run ./bench
//
// It needs redis-server on the PATH, builds ./cmd/caddy, starts every
// process on 127.0.0.1 only, measures the configurations in turn (A B C D,
// A B C D, ...), and writes bench/results/{results.json,summary.md,chart.png}.
// With the defaults it takes about 5 minutes; it gives up after -budget.
// Short runs, alternated, let the configurations share the machine's
// background noise; medians over the rounds, and per-round paired
// comparisons with bare Caddy, keep a noisy round from deciding.
//
// Phases: closed loop (-conns connections, each sending its next request
// when the previous answer arrives) for peak throughput; then open loop at
// half of bare Caddy's median peak, on a fixed schedule, for latency. Redis
// commands per request come from INFO commandstats before and after each
// guarded run.
//
// On a machine with at least 2 CPUs (and taskset), the Caddy processes run
// on the last CPU with GOMAXPROCS=1 and everything else (this load
// generator, the backend, Redis) on the others, so the generator does not
// take CPU from the server it measures: the figures are what Caddy does
// with one core. -pin=false runs everything unpinned.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// benchSecret is the store secret of the benchmark's throwaway Redis.
const benchSecret = "bench-only-secret-0123456789abcdef0123456789"

var (
	flagRounds   = flag.Int("rounds", 6, "measurement rounds (each measures every configuration once)")
	flagDuration = flag.Duration("duration", 4*time.Second, "length of each measured run")
	flagWarmup   = flag.Duration("warmup", time.Second, "unmeasured load before each closed-loop run")
	flagKeys     = flag.Int("keys", 10000, "API keys in the store, all of them used by the load")
	flagStored   = flag.Int("stored-keys", 0, "API keys in the store in all (at least -keys): the ones beyond -keys are stored but never used")
	flagConns    = flag.Int("conns", 32, "connections of the closed-loop runs")
	flagOpenConn = flag.Int("open-conns", 64, "most connections of the open-loop runs")
	flagOut      = flag.String("out", "bench/results", "directory for results.json, summary.md and chart.png")
	flagBudget   = flag.Duration("budget", 14*time.Minute, "abort if the whole benchmark takes longer")
	flagPin      = flag.Bool("pin", true, "run Caddy on the last CPU (GOMAXPROCS=1) and the rest on the others, with taskset")
	flagCaddyEnv = flag.String("caddy-env", "", "extra environment of the Caddy processes, comma-separated (e.g. GODEBUG=gctrace=1)")
	flagKeep     = flag.Bool("keep", false, "keep the working directory (configs and process logs) and print its path")
	flagProfile  = flag.Duration("cpuprofile", 0, "after the measurements, profile each Caddy for this long under closed-loop load; profiles go to -out as <config>.pprof")
	flagBackend  = flag.String("serve-backend", "", "internal: run as the backend on this address")
	flagPhases   = flag.String("phases", "peak,latency,cpu", "phases to run, comma-separated: peak (closed-loop throughput), latency (open loop), cpu (CPU time per request)")
	flagCPUReqs  = flag.Int64("cpu-requests", 40000, "requests per run of the cpu phase")
	flagCPUConns = flag.Int("cpu-conns", 16, "connections of the cpu phase")
	flagCPURate  = flag.Float64("cpu-rate", 0, "send the cpu phase's requests open loop at this rate (requests/s) instead of closed loop")
	flagPlan     = flag.String("plan", "", "give every key a plan with these subdirectives, ';'-separated (e.g. \"rate_limit 100 1m; quota 10000000 month\"): the limiter's cost and Redis commands are then in the figures; a 429 counts as an error")
	flagIdle     = flag.Duration("idle", 10*time.Second, "after the cpu phase, measure each Caddy's CPU use with no requests for this long (0: skip)")
	flagNoCache  = flag.Bool("nocache", true, "also measure the apikeys guard with its cache off")
	flagIdleSkip = flag.Duration("idle-after", 0, "start the idle measurement this long after the load stops (its CPU is reported apart): 65s leaves out the last-used flush that follows the load within last_used_interval (1m)")
	flagIdlePerf = flag.Bool("idle-profile", false, "profile each Caddy over the idle window (-idle), into -out as <config>-idle.pprof")
)

// config is one measured configuration.
type config struct {
	Name    string `json:"name"`
	Label   string `json:"label"`
	addr    string
	admin   string // Caddy's admin address
	guarded bool
	target  *target
	cmd     *exec.Cmd // the Caddy process
	started time.Time // when it was started
}

func main() {
	flag.Parse()
	if *flagBackend != "" {
		serveBackend(*flagBackend)
		return
	}
	log.SetFlags(log.Ltime)
	if *flagPin && os.Getenv("APIKEYS_BENCH_PINNED") == "" {
		if err := repin(); err != nil {
			log.Printf("not pinning CPUs: %v", err)
		}
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	ctx, cancelBudget := context.WithTimeout(ctx, *flagBudget)
	defer cancelBudget()
	if err := run(ctx); err != nil {
		cleanup()
		log.Fatal(err)
	}
	cleanup()
}

// caddyCPU is the CPU the Caddy processes are pinned to ("" when not
// pinning).
var caddyCPU = os.Getenv("APIKEYS_BENCH_CADDY_CPU")

// repin runs this program again with its affinity set to every CPU but the
// last, which it leaves to Caddy; it only returns on failure.
func repin() error {
	n := runtime.NumCPU()
	if n < 2 {
		return errors.New("fewer than 2 CPUs")
	}
	taskset, err := exec.LookPath("taskset")
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	others := "0"
	if n > 2 {
		others = fmt.Sprintf("0-%d", n-2)
	}
	env := append(os.Environ(), "APIKEYS_BENCH_PINNED=1", fmt.Sprintf("APIKEYS_BENCH_CADDY_CPU=%d", n-1))
	args := append([]string{taskset, "-c", others, self}, os.Args[1:]...)
	return syscall.Exec(taskset, args, env)
}

// serveBackend is the upstream: a small fixed answer, as cheap as it gets.
func serveBackend(addr string) {
	body := []byte(`{"ok":true}` + "\n")
	log.Fatal(http.ListenAndServe(addr, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = w.Write(body)
	})))
}

func run(ctx context.Context) error {
	started := time.Now()
	if _, err := os.Stat("cmd/caddy"); err != nil {
		return errors.New("run this from the repository root: go run ./bench")
	}
	redisBin, err := exec.LookPath("redis-server")
	if err != nil {
		return errors.New("redis-server is not on the PATH (Debian: apt-get install redis-server)")
	}
	tmp, err := os.MkdirTemp("", "apikeys-bench-")
	if err != nil {
		return err
	}
	if *flagKeep {
		defer log.Printf("kept the working directory %s", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}

	log.Printf("building ./cmd/caddy")
	caddyBin := filepath.Join(tmp, "caddy")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", caddyBin, "./cmd/caddy").CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
	}

	redisAddr := freeAddr()
	if _, err := start(ctx, tmp, "redis", redisBin, "--port", portOf(redisAddr), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", tmp); err != nil {
		return err
	}
	backendAddr := freeAddr()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if _, err := start(ctx, tmp, "backend", self, "-serve-backend", backendAddr); err != nil {
		return err
	}
	for _, a := range []string{redisAddr, backendAddr} {
		if err := waitListening(ctx, a); err != nil {
			return err
		}
	}
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	defer rdb.Close()

	log.Printf("storing %d keys in Redis", *flagKeys)
	keys, err := seedKeys(ctx, "redis://"+redisAddr+"/0", *flagKeys)
	if err != nil {
		return err
	}
	if extra := *flagStored - *flagKeys; extra > 0 {
		t0 := time.Now()
		log.Printf("storing %d more keys in Redis, never used", extra)
		if _, err := seedKeys(ctx, "redis://"+redisAddr+"/0", extra); err != nil {
			return err
		}
		log.Printf("stored them in %v", time.Since(t0).Round(time.Second))
	}

	configs := []*config{
		{Name: "backend", Label: "BACKEND", addr: backendAddr},
		{Name: "caddy", Label: "CADDY", addr: freeAddr()},
		{Name: "apikeys", Label: "APIKEYS", addr: freeAddr(), guarded: true},
	}
	if *flagNoCache {
		configs = append(configs, &config{Name: "apikeys-nocache", Label: "NO CACHE", addr: freeAddr(), guarded: true})
	}
	phases := map[string]bool{}
	for _, p := range strings.Split(*flagPhases, ",") {
		phases[strings.TrimSpace(p)] = true
	}
	for _, c := range configs[1:] {
		if err := startCaddy(ctx, tmp, caddyBin, c, backendAddr, redisAddr); err != nil {
			return err
		}
	}
	for _, c := range configs {
		if err := waitListening(ctx, c.addr); err != nil {
			return err
		}
		c.target = newTarget(c.addr, "/v1/items", keys)
	}
	if err := sanityCheck(configs, keys); err != nil {
		return err
	}
	// Every key is in use, as in a steady state with 10k active keys.
	log.Printf("warming the apikeys cache with every key once")
	warmAllKeys(configs[2].target)

	runs := map[string][]result{}
	lat := map[string][]result{}
	seed := uint64(1)
	rate := 0.0
	if phases["peak"] {
		log.Printf("phase 1: peak throughput, closed loop, %d connections, %d rounds of %v (+%v warm-up)", *flagConns, *flagRounds, *flagDuration, *flagWarmup)
		for round := 1; round <= *flagRounds; round++ {
			for _, c := range configs {
				if err := ctx.Err(); err != nil {
					return err
				}
				closedLoop(c.target, *flagConns, *flagWarmup, seed)
				seed += 100
				before := redisCommands(ctx, rdb)
				r := closedLoop(c.target, *flagConns, *flagDuration, seed)
				seed += 100
				r.RedisCmds = redisCommands(ctx, rdb) - before
				runs[c.Name] = append(runs[c.Name], r)
				log.Printf("  round %d %-16s %8.0f req/s  errors %d  redis cmds %d", round, c.Name, r.RPS, r.Errors, r.RedisCmds)
			}
		}
	}
	if phases["peak"] && phases["latency"] {
		barePeak := median(runs["caddy"], func(r result) float64 { return r.RPS })
		rate = barePeak / 2
		keyOrder = zipfSequence(int(rate*flagDuration.Seconds())+1, len(keys), 42)
		log.Printf("phase 2: latency, open loop at %.0f req/s (half of bare Caddy's median peak), %d rounds of %v", rate, *flagRounds, *flagDuration)
		for round := 1; round <= *flagRounds; round++ {
			for _, c := range configs {
				if err := ctx.Err(); err != nil {
					return err
				}
				openLoop(c.target, rate, *flagOpenConn, time.Second, seed) // settle
				before := redisCommands(ctx, rdb)
				r := openLoop(c.target, rate, *flagOpenConn, *flagDuration, seed)
				r.RedisCmds = redisCommands(ctx, rdb) - before
				lat[c.Name] = append(lat[c.Name], r)
				log.Printf("  round %d %-16s p50 %6v  p99 %7v  p99.9 %7v  errors %d  late sends %d  redis cmds %d",
					round, c.Name, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), r.P999.Round(time.Microsecond), r.Errors, r.Behind, r.RedisCmds)
			}
		}
	}

	var cpu []cpuSummary
	if phases["cpu"] {
		var err error
		if cpu, err = cpuPhase(ctx, configs[1:], rdb); err != nil {
			return err
		}
	}

	if *flagProfile > 0 {
		for _, c := range configs[1:] {
			if err := cpuProfile(c, *flagProfile, seed); err != nil {
				return err
			}
		}
	}

	rep := newReport(configs, runs, lat, rate, time.Since(started))
	rep.CPU, rep.CPURequests, rep.CPUConns, rep.IdleFor, rep.CPURate = cpu, *flagCPUReqs, *flagCPUConns, flagIdle.String(), *flagCPURate
	if *flagIdleSkip > 0 {
		rep.IdleAfter = flagIdleSkip.String()
	}
	rep.Targets = append(rep.Targets, cpuTargets(cpu)...)
	if err := rep.write(*flagOut); err != nil {
		return err
	}
	fmt.Println(rep.markdown())
	log.Printf("wrote %s/{results.json,summary.md,chart.png} in %v", *flagOut, time.Since(started).Round(time.Second))
	return nil
}

// seedKeys mints n keys, stores their records the way the module does, and
// returns the raw keys.
func seedKeys(ctx context.Context, url string, n int) ([]string, error) {
	store, err := keystore.NewRedis(keystore.RedisOptions{URLs: []string{url}})
	if err != nil {
		return nil, err
	}
	defer store.Close()
	hasher, err := keystore.NewHasher([]byte(benchSecret))
	if err != nil {
		return nil, err
	}
	keys := make([]string, n)
	// Enough creates in flight to keep Redis busy (each is a few round
	// trips): about 30,000 keys a second here.
	const workers = 64
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				raw, err := keystore.Mint(keystore.DefaultPrefix)
				if err != nil {
					errs <- err
					return
				}
				id, err := keystore.NewKeyID()
				if err != nil {
					errs <- err
					return
				}
				k := &keystore.Key{ID: id, Owner: fmt.Sprintf("owner-%d", i%100), Name: "bench",
					Prefix: keystore.DisplayPrefix(keystore.DefaultPrefix, raw), Digest: hasher.Digest(raw),
					CreatedAt: time.Now().UTC().Truncate(time.Millisecond), Plan: benchPlanName()}
				if err := store.Create(ctx, k); err != nil {
					errs <- err
					return
				}
				keys[i] = raw
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	return keys, nil
}

// benchPlanName is the plan every seeded key gets: "bench" with -plan.
func benchPlanName() string {
	if *flagPlan == "" {
		return ""
	}
	return "bench"
}

// benchPlanConfig is the -plan's Caddyfile lines inside apikeys.
func benchPlanConfig() string {
	if *flagPlan == "" {
		return ""
	}
	var b strings.Builder
	b.WriteString("\t\tplan bench {\n")
	for line := range strings.SplitSeq(*flagPlan, ";") {
		if line = strings.TrimSpace(line); line != "" {
			b.WriteString("\t\t\t" + line + "\n")
		}
	}
	b.WriteString("\t\t}\n")
	return b.String()
}

func startCaddy(ctx context.Context, dir, bin string, c *config, backendAddr, redisAddr string) error {
	guard := ""
	switch c.Name {
	case "apikeys":
		guard = fmt.Sprintf("apikeys {\n\t\tstore redis redis://%s/0\n\t\tsecret {env.APIKEYS_SECRET}\n%s\t}", redisAddr, benchPlanConfig())
	case "apikeys-nocache":
		guard = fmt.Sprintf("apikeys {\n\t\tstore redis redis://%s/0\n\t\tsecret {env.APIKEYS_SECRET}\n\t\tcache off\n%s\t}", redisAddr, benchPlanConfig())
	}
	// The admin endpoint serves /debug/vars (heap, GC) and profiles.
	c.admin = freeAddr()
	admin := "admin " + c.admin
	cfg := fmt.Sprintf(`{
	%s
	auto_https off
	persist_config off
}

http://%s {
	%s
	reverse_proxy %s
}
`, admin, c.addr, guard, backendAddr)
	path := filepath.Join(dir, c.Name+".Caddyfile")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return err
	}
	args := []string{"run", "--config", path, "--adapter", "caddyfile"}
	var err error
	c.started = time.Now()
	if caddyCPU != "" {
		taskset, lerr := exec.LookPath("taskset")
		if lerr != nil {
			return lerr
		}
		// taskset execs Caddy: the process keeps its PID.
		c.cmd, err = start(ctx, dir, c.Name, taskset, append([]string{"-c", caddyCPU, bin}, args...)...)
		return err
	}
	c.cmd, err = start(ctx, dir, c.Name, bin, args...)
	return err
}

var (
	procsMu sync.Mutex
	procs   []*exec.Cmd
)

// start runs a child process that dies with this one; its output goes to
// <dir>/<name>.log.
func start(ctx context.Context, dir, name, bin string, args ...string) (*exec.Cmd, error) {
	logf, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "APIKEYS_SECRET="+benchSecret,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	if caddyCPU != "" && filepath.Base(bin) == "taskset" {
		cmd.Env = append(cmd.Env, "GOMAXPROCS=1")
	}
	if strings.HasPrefix(name, "caddy") || strings.HasPrefix(name, "apikeys") {
		if *flagCaddyEnv != "" {
			cmd.Env = append(cmd.Env, strings.Split(*flagCaddyEnv, ",")...)
		}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	procsMu.Lock()
	procs = append(procs, cmd)
	procsMu.Unlock()
	return cmd, ctx.Err()
}

// cleanup kills the child processes this program started.
func cleanup() {
	procsMu.Lock()
	defer procsMu.Unlock()
	for _, p := range procs {
		_ = p.Process.Kill()
		_ = p.Wait()
	}
	procs = nil
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func portOf(addr string) string {
	_, port, _ := net.SplitHostPort(addr)
	return port
}

func waitListening(ctx context.Context, addr string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s is not listening: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sanityCheck makes sure each configuration answers as expected: 200 with
// a key, and for the guarded ones 401 with a key that was never stored.
func sanityCheck(configs []*config, keys []string) error {
	fake, err := keystore.Mint(keystore.DefaultPrefix)
	if err != nil {
		return err
	}
	for _, c := range configs {
		cl := &client{addr: c.addr}
		status, err := cl.do(c.target.requests[0])
		if err != nil || status != 200 {
			return fmt.Errorf("%s: a valid key got %d, %v", c.Name, status, err)
		}
		if c.guarded {
			bad := newTarget(c.addr, "/v1/items", []string{fake})
			if status, err := cl.do(bad.requests[0]); err != nil || status != 401 {
				return fmt.Errorf("%s: an unknown key got %d, %v", c.Name, status, err)
			}
		}
		cl.close()
	}
	return nil
}

// warmAllKeys sends one request with every key.
func warmAllKeys(t *target) {
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			c := &client{addr: t.addr}
			defer c.close()
			for i := w; i < len(t.requests); i += 16 {
				_, _ = c.do(t.requests[i])
			}
		})
	}
	wg.Wait()
}

// redisCommands sums the calls of every command Redis has run, except the
// INFO and connection set-up commands of this program's own client.
func redisCommands(ctx context.Context, rdb *redis.Client) int64 {
	info, err := rdb.Info(ctx, "commandstats").Result()
	if err != nil {
		log.Printf("INFO commandstats: %v", err)
		return 0
	}
	var total int64
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(line), "cmdstat_"), ":calls=")
		if !ok || name == "info" || name == "hello" || strings.HasPrefix(name, "client|") {
			continue
		}
		n, _ := strconv.ParseInt(strings.SplitN(rest, ",", 2)[0], 10, 64)
		total += n
	}
	return total
}

func median(rs []result, f func(result) float64) float64 {
	vals := make([]float64, len(rs))
	for i, r := range rs {
		vals[i] = f(r)
	}
	slices.Sort(vals)
	if len(vals) == 0 {
		return 0
	}
	if len(vals)%2 == 1 {
		return vals[len(vals)/2]
	}
	return (vals[len(vals)/2-1] + vals[len(vals)/2]) / 2
}

// machine describes where the benchmark ran.
func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if name, ok := strings.CutPrefix(line, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
				break
			}
		}
	}
	redisVersion := "redis-server ?"
	if out, err := exec.Command("redis-server", "--version").Output(); err == nil {
		redisVersion = strings.Join(strings.Fields(string(out))[:3], " ")
	}
	cpus := 0
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		cpus = strings.Count(string(b), "\nprocessor") + strings.Count(string(b[:min(len(b), 10)]), "processor")
	}
	return fmt.Sprintf("%s, %d CPUs, %s/%s, %s, %s", cpu, cpus, runtime.GOOS, runtime.GOARCH, runtime.Version(), redisVersion)
}

// writeJSON writes v to path, indented.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// cpuProfile fetches a CPU profile of c's Caddy (from its admin endpoint)
// taken while a closed-loop load runs, into <out>/<name>.pprof.
func cpuProfile(c *config, d time.Duration, seed uint64) error {
	if err := os.MkdirAll(*flagOut, 0o755); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Every key in turn, as in the cpu phase (at its rate, if set:
		// then profiles of the configurations compare per request).
		var next atomic.Int64
		if *flagCPURate > 0 {
			roundRobinRate(c.target, max(*flagCPUConns, 64), int64(*flagCPURate*(d+2*time.Second).Seconds()), *flagCPURate, &next)
		} else {
			roundRobinUntil(c.target, *flagCPUConns, 1<<62, time.Now().Add(d+2*time.Second), &next)
		}
	}()
	time.Sleep(time.Second)
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", c.admin, int(d.Seconds()))
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("profile of %s: %s", c.Name, resp.Status)
	}
	f, err := os.Create(filepath.Join(*flagOut, c.Name+".pprof"))
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	<-done
	log.Printf("wrote %s", f.Name())
	return f.Close()
}
