package apikeys

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "apikeys",
		Usage: "<create|list|find|get|disable|enable|revoke|rotate|dev-token|backup|restore> --config <path> [flags]",
		Short: "Manage API keys of the apikeys handler from the command line",
		Long: `
Tools for operators of the apikeys handler. Each command reads the config (a
Caddyfile or JSON, --config and --adapter as for caddy run), takes the first
apikeys handler in it, resolves its {env.*} placeholders from the
environment (and --envfile), and works on the configured store directly.

  create     mint a key for --owner; prints it (the only time it is shown)
  list       an owner's keys, newest first
  find       the keys a whole key or its display prefix names
  get        one key by ID, with its owner
  disable    suspend a key (403 key_disabled) without revoking it
  enable     enable a disabled key again
  revoke     revoke a key by ID, or --owner <id> --all (offboarding)
  rotate     replace a key, keeping the old one working for --grace
  dev-token  print a dashboard JWT for trying the management API locally
  backup     write a consistent copy of the file store, also while Caddy runs
  restore    replace the file store with such a copy (Caddy stopped)

The file store can be opened by one process at a time: stop Caddy (or use
the HTTP API) to manage keys in a file store; backup goes through a running
Caddy's admin API. Redis stores can be managed while Caddy runs.

Commands print their result only; --verbose also logs loading the config.
`,
		CobraFunc: addSubcommands,
	})
}

// addSubcommands adds the `caddy apikeys` subcommands to cmd.
func addSubcommands(cmd *cobra.Command) {
	configFlags := func(c *cobra.Command) {
		c.Flags().StringP("config", "c", "", "Configuration file (required)")
		c.Flags().StringP("adapter", "a", "", "Name of config adapter to apply")
		c.Flags().String("envfile", "", "Environment file to load before resolving placeholders")
		c.Flags().BoolP("verbose", "v", false, "Log loading the config and audit events to stderr")
		c.SilenceUsage = true
	}
	dev := &cobra.Command{
		Use:   "dev-token",
		Short: "Print a dashboard JWT for local testing",
		Long: `Prints a dashboard JWT signed with the HMAC secret of the config's
dashboard_jwt, for --owner, with the configured issuer and audience. Meant for
development: in production the dashboard issues tokens.

--claim adds or replaces a claim, for trying scopes_claim for example:

  caddy apikeys dev-token --config Caddyfile --owner alice \
    --claim 'scopes=["analytics:read"]' --claim org=acme`,
		Args: cobra.NoArgs,
		RunE: runDevToken,
	}
	configFlags(dev)
	dev.Flags().String("owner", "dev-user", "Owner (subject) of the token")
	dev.Flags().Duration("ttl", time.Hour, "Lifetime of the token")
	dev.Flags().StringArray("claim", nil, "Extra claim `name=value`, repeatable; a value that is JSON (an array, a number, true) is used as such, anything else as a string")

	create := &cobra.Command{
		Use:   "create --owner <id> --name <name> [--scopes a,b] [--expires-in-days n] [--plan p]",
		Short: "Mint a key and print it once, as JSON",
		Args:  cobra.NoArgs,
		RunE:  runCreate,
	}
	configFlags(create)
	create.Flags().String("owner", "", "Owner of the key (required)")
	create.Flags().String("name", "", "Name of the key (required)")
	create.Flags().StringSlice("scopes", nil, "Scopes, comma-separated; omit for full access")
	create.Flags().Int("expires-in-days", 0, "Lifetime in days; omit for no expiry")
	create.Flags().String("plan", "", "Plan of the key; omit for default_plan (or none)")

	list := &cobra.Command{
		Use:   "list --owner <id> [--status s] [--json]",
		Short: "List an owner's keys, newest first",
		Args:  cobra.NoArgs,
		RunE:  runList,
	}
	configFlags(list)
	list.Flags().String("owner", "", "Owner whose keys to list (required)")
	list.Flags().String("status", "", "Only keys with this status: "+strings.Join(keyStatuses, ", "))
	list.Flags().Bool("json", false, "Print JSON lines instead of a table")

	revoke := &cobra.Command{
		Use:   "revoke <key_id> | revoke --owner <id> --all",
		Short: "Revoke a key, or every key of an owner",
		Args:  cobra.MaximumNArgs(1),
		RunE:  runRevoke,
	}
	configFlags(revoke)
	revoke.Flags().String("owner", "", "With --all: the owner whose keys to revoke")
	revoke.Flags().Bool("all", false, "Revoke every key of --owner that still validates, and report how many")

	rotate := &cobra.Command{
		Use:   "rotate <key_id> [--grace 24h]",
		Short: "Replace a key; print the new one once, as JSON",
		Args:  cobra.ExactArgs(1),
		RunE:  runRotate,
	}
	configFlags(rotate)
	rotate.Flags().Duration("grace", DefaultGracePeriod, "How long the old key keeps working (0 to 720h)")

	cmd.AddCommand(dev, create, list, revoke, rotate)
	addBackupCommands(cmd, configFlags)
	addOperatorCommands(cmd, configFlags)
}

// openFromConfig loads the config and sets up its first apikeys handler's
// store, as Caddy would, for a command. close releases the store.
func openFromConfig(cmd *cobra.Command) (h *Handler, close func(), err error) {
	cfgJSON, err := loadCommandConfig(cmd)
	if err != nil {
		return nil, nil, err
	}
	raw, err := findHandlerJSON(cfgJSON, func(map[string]any) bool { return true })
	if err != nil {
		return nil, nil, err
	}
	h = new(Handler)
	if err := json.Unmarshal(raw, h); err != nil {
		return nil, nil, fmt.Errorf("decoding the apikeys handler config: %w", err)
	}
	h.DashboardJWT = nil // commands act as the operator, not as a session
	if err := h.provisionCore(caddy.Context{}, cmdLogger(cmd)); err != nil {
		_ = h.Cleanup()
		return nil, nil, err
	}
	if err := h.Validate(); err != nil {
		_ = h.Cleanup()
		return nil, nil, err
	}
	return h, func() { _ = h.Cleanup() }, nil
}

// cmdContext bounds a command's store calls.
func cmdContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 10*time.Second)
}

// apiErr turns an API error into a command error.
func apiErr(aerr *apiError) error {
	if aerr.field != "" {
		return fmt.Errorf("%s (%s): %s", aerr.code, aerr.field, aerr.message)
	}
	return fmt.Errorf("%s: %s", aerr.code, aerr.message)
}

func runCreate(cmd *cobra.Command, _ []string) error {
	fl := cmd.Flags()
	owner, _ := fl.GetString("owner")
	name, _ := fl.GetString("name")
	scopes, _ := fl.GetStringSlice("scopes")
	days, _ := fl.GetInt("expires-in-days")
	if owner == "" || name == "" {
		return errors.New("--owner and --name are required")
	}
	h, closeStore, err := openFromConfig(cmd)
	if err != nil {
		return err
	}
	defer closeStore()
	// The same validation as the HTTP API, on the same request shape.
	req := map[string]any{"name": name}
	if fl.Changed("scopes") {
		req["scopes"] = scopes
	}
	if fl.Changed("expires-in-days") {
		req["expires_in_days"] = days
	}
	if fl.Changed("plan") {
		req["plan"], _ = fl.GetString("plan")
	}
	body, _ := json.Marshal(req)
	ctx, cancel := cmdContext()
	defer cancel()
	parsed, aerr := h.parseCreateRequest(body)
	var op *mintOp
	if aerr == nil {
		op, aerr = h.prepareCreate(ctx, jwtauth.Claims{Owner: owner}, parsed)
	}
	return h.finishMint(ctx, cmd, op, aerr)
}

// finishMint stores a prepared key and prints it once, as the API answers.
func (h *Handler) finishMint(ctx context.Context, cmd *cobra.Command, op *mintOp, aerr *apiError) error {
	if aerr == nil {
		aerr = h.executeMint(ctx, op)
	}
	if aerr != nil {
		return apiErr(aerr)
	}
	_, err := fmt.Fprintln(cmd.OutOrStdout(), string(op.respBody))
	return err
}

func runList(cmd *cobra.Command, _ []string) error {
	fl := cmd.Flags()
	owner, _ := fl.GetString("owner")
	status, _ := fl.GetString("status")
	asJSON, _ := fl.GetBool("json")
	if owner == "" {
		return errors.New("--owner is required")
	}
	if status != "" && !slices.Contains(keyStatuses, status) {
		return fmt.Errorf("--status %q is not a key status; want one of %s", status, strings.Join(keyStatuses, ", "))
	}
	h, closeStore, err := openFromConfig(cmd)
	if err != nil {
		return err
	}
	defer closeStore()
	ctx, cancel := cmdContext()
	defer cancel()
	out := cmd.OutOrStdout()
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	if !asJSON {
		fmt.Fprintln(tw, "KEY_ID\tNAME\tPREFIX\tSTATUS\tSCOPES\tCREATED\tEXPIRES\tLAST_USED")
	}
	now := h.now()
	cursor := ""
	for {
		keys, next, err := h.store.List(ctx, owner, cursor, 100)
		if err != nil {
			return err
		}
		for _, k := range keys {
			if status != "" && k.Status(now) != status {
				continue
			}
			v := newKeyView(k, now)
			if asJSON {
				b, _ := marshalJSON(v)
				fmt.Fprintln(out, string(b))
				continue
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.KeyID, v.Name, v.Prefix, v.Status,
				scopeString(k), fmtTime(&k.CreatedAt), fmtTime(k.ExpiresAt), fmtTime(k.LastUsedAt))
		}
		if next == "" {
			break
		}
		cursor = next
	}
	return tw.Flush()
}

func fmtTime(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(apiTimeLayout)
}

func runRevoke(cmd *cobra.Command, args []string) error {
	owner, _ := cmd.Flags().GetString("owner")
	all, _ := cmd.Flags().GetBool("all")
	switch {
	case all && (owner == "" || len(args) > 0):
		return errors.New("--all revokes every key of --owner: give --owner and no key ID")
	case all:
		return runRevokeAll(cmd, owner)
	case len(args) != 1 || owner != "":
		return errors.New("give one key ID, or --owner <id> --all")
	}
	h, closeStore, err := openFromConfig(cmd)
	if err != nil {
		return err
	}
	defer closeStore()
	ctx, cancel := cmdContext()
	defer cancel()
	k, err := h.store.Revoke(ctx, args[0], h.now().UTC().Truncate(time.Millisecond))
	if err != nil {
		return keyErr(err, args[0])
	}
	h.audit("revoked", k)
	b, _ := marshalJSON(newKeyView(k, h.now()))
	_, err = fmt.Fprintln(cmd.OutOrStdout(), string(b))
	return err
}

func runRotate(cmd *cobra.Command, args []string) error {
	grace, _ := cmd.Flags().GetDuration("grace")
	if grace < 0 || grace > maxGracePeriodSeconds*time.Second {
		return errors.New("--grace must be between 0 and 720h")
	}
	h, closeStore, err := openFromConfig(cmd)
	if err != nil {
		return err
	}
	defer closeStore()
	ctx, cancel := cmdContext()
	defer cancel()
	k, err := h.store.Get(ctx, args[0])
	if err != nil {
		return keyErr(err, args[0])
	}
	op, aerr := h.prepareRotate(ctx, jwtauth.Claims{Owner: k.Owner}, k.ID, grace, "")
	return h.finishMint(ctx, cmd, op, aerr)
}

// loadCommandConfig loads --envfile, then the JSON of --config.
func loadCommandConfig(cmd *cobra.Command) ([]byte, error) {
	fl := cmd.Flags()
	configFile, _ := fl.GetString("config")
	adapter, _ := fl.GetString("adapter")
	envFile, _ := fl.GetString("envfile")
	if configFile == "" {
		return nil, errors.New("--config is required")
	}
	if envFile != "" {
		if err := loadEnvFile(envFile); err != nil {
			return nil, err
		}
	}
	return loadConfig(cmdLogger(cmd), configFile, adapter)
}

// keyStatuses are the values of a key's status, as listed.
var keyStatuses = []string{"active", "rotating", "disabled", "expired", "revoked"}

// cmdLogger is Caddy's logger with --verbose, and no logger without: a
// command's output is its result, and its errors are its exit status and
// message.
func cmdLogger(cmd *cobra.Command) *zap.Logger {
	if v, _ := cmd.Flags().GetBool("verbose"); v {
		return caddy.Log().Named("apikeys")
	}
	return zap.NewNop()
}

// loadConfig reads a config file and adapts it to JSON as `caddy run`
// does (the caddyfile adapter for files named Caddyfile* or *.caddyfile),
// logging to logger: caddycmd.LoadConfig always logs to Caddy's logger.
func loadConfig(logger *zap.Logger, configFile, adapterName string) ([]byte, error) {
	config, err := os.ReadFile(configFile)
	if err != nil {
		return nil, fmt.Errorf("reading config from file: %w", err)
	}
	logger.Info("using config from file", zap.String("file", configFile))
	base := strings.ToLower(filepath.Base(configFile))
	if adapterName == "" && filepath.Ext(base) != ".json" && (strings.HasPrefix(base, "caddyfile") || strings.HasSuffix(base, ".caddyfile")) {
		adapterName = "caddyfile"
	}
	if adapterName == "" {
		if !json.Valid(config) {
			return nil, errors.New("config is not valid JSON; did you mean to use a config adapter (the --adapter flag)?")
		}
		return config, nil
	}
	adapter := caddyconfig.GetAdapter(adapterName)
	if adapter == nil {
		return nil, fmt.Errorf("unrecognized config adapter: %s", adapterName)
	}
	adapted, warnings, err := adapter.Adapt(config, map[string]any{"filename": configFile})
	if err != nil {
		return nil, fmt.Errorf("adapting config using %s: %w", adapterName, err)
	}
	logger.Info("adapted config to JSON", zap.String("adapter", adapterName))
	for _, w := range warnings {
		logger.Warn(w.Message, zap.String("directive", w.Directive), zap.String("file", w.File), zap.Int("line", w.Line))
	}
	return adapted, nil
}

// parseClaims reads --claim name=value flags: a value that is valid JSON is
// decoded, anything else is a string.
func parseClaims(flags []string) (map[string]any, error) {
	claims := make(map[string]any, len(flags))
	for _, f := range flags {
		name, value, ok := strings.Cut(f, "=")
		if !ok || name == "" {
			return nil, fmt.Errorf("--claim %q: want name=value, e.g. --claim org=acme or --claim 'scopes=[\"analytics:read\"]'", f)
		}
		var v any = value
		if json.Valid([]byte(value)) {
			_ = json.Unmarshal([]byte(value), &v)
		}
		claims[name] = v
	}
	return claims, nil
}

func runDevToken(cmd *cobra.Command, _ []string) error {
	owner, _ := cmd.Flags().GetString("owner")
	ttl, _ := cmd.Flags().GetDuration("ttl")
	if owner == "" || ttl <= 0 {
		return errors.New("--owner must not be empty and --ttl must be positive")
	}
	claimFlags, _ := cmd.Flags().GetStringArray("claim")
	extra, err := parseClaims(claimFlags)
	if err != nil {
		return err
	}
	cfgJSON, err := loadCommandConfig(cmd)
	if err != nil {
		return err
	}
	jwtCfg, err := findDashboardJWT(cfgJSON)
	if err != nil {
		return err
	}
	secret, err := resolveSecret(caddy.NewReplacer(), "dashboard_jwt secret", jwtCfg.Secret)
	if err != nil {
		return err
	}
	now := time.Now()
	claimName := jwtCfg.OwnerClaim
	if claimName == "" {
		claimName = "sub"
	}
	claims := map[string]any{claimName: owner, "iat": now.Unix(), "exp": now.Add(ttl).Unix()}
	if claimName != "sub" {
		claims["sub"] = owner
	}
	if jwtCfg.Issuer != "" {
		claims["iss"] = jwtCfg.Issuer
	}
	if jwtCfg.Audience != "" {
		claims["aud"] = jwtCfg.Audience
	}
	maps.Copy(claims, extra)
	alg := "HS256"
	if len(jwtCfg.Algorithms) > 0 {
		alg = jwtCfg.Algorithms[0]
	}
	token, err := jwtauth.SignHMAC(secret, alg, claims)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(cmd.OutOrStdout(), token)
	return err
}

// findDashboardJWT returns the dashboard_jwt of the first apikeys handler in
// a JSON config that verifies with an HMAC secret.
func findDashboardJWT(cfgJSON []byte) (*DashboardJWT, error) {
	raw, err := findHandlerJSON(cfgJSON, func(h map[string]any) bool {
		jwtCfg, _ := h["dashboard_jwt"].(map[string]any)
		secret, _ := jwtCfg["secret"].(string)
		return secret != ""
	})
	if err != nil {
		return nil, errors.New("no apikeys handler with a dashboard_jwt secret in this config (dev-token signs HMAC tokens only)")
	}
	var h Handler
	if err := json.Unmarshal(raw, &h); err != nil {
		return nil, err
	}
	return h.DashboardJWT, nil
}

// findHandlerJSON returns the JSON of the first apikeys handler in a config
// for which match is true.
func findHandlerJSON(cfgJSON []byte, match func(map[string]any) bool) ([]byte, error) {
	var root any
	if err := json.Unmarshal(cfgJSON, &root); err != nil {
		return nil, err
	}
	var found map[string]any
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if found == nil && v["handler"] == "apikeys" && match(v) {
				found = v
			}
			for _, child := range v {
				walk(child)
			}
		case []any:
			for _, child := range v {
				walk(child)
			}
		}
	}
	walk(root)
	if found == nil {
		return nil, errors.New("no apikeys handler in this config")
	}
	return json.Marshal(found)
}

// loadEnvFile sets the KEY=VALUE lines of an environment file (blank lines
// and # comments skipped; surrounding quotes removed).
func loadEnvFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("reading environment file: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.TrimSpace(k) == "" {
			return fmt.Errorf("%s:%d: want KEY=VALUE", path, n)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		if err := os.Setenv(strings.TrimSpace(k), v); err != nil {
			return err
		}
	}
	return sc.Err()
}

// scopeString renders a key's scopes as the identity header does.
func scopeString(k *keystore.Key) string {
	if k.FullAccess() {
		return keystore.FullAccessScopes
	}
	return strings.Join(k.Scopes, " ")
}

// keyErr is a key command's answer to err from the store about key id.
func keyErr(err error, id string) error {
	if errors.Is(err, keystore.ErrNotFound) {
		return fmt.Errorf("no key %q", id)
	}
	return err
}
