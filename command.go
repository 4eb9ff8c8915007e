package apikeys

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "apikeys",
		Usage: "dev-token --config <path> [--adapter <name>] [--envfile <path>] [--owner <id>] [--ttl <duration>]",
		Short: "Tools for the apikeys handler",
		Long: `
Tools for operators of the apikeys handler.

dev-token prints a dashboard JWT for trying the management API locally. It
reads the config (a Caddyfile or JSON), finds the apikeys handler whose
dashboard_jwt uses an HMAC secret, resolves that secret's placeholder from
the environment (and --envfile), and signs a short-lived token for --owner,
with the configured issuer and audience.

It is meant for development: in production the dashboard issues tokens.
`,
		CobraFunc: addSubcommands,
	})
}

// addSubcommands adds the `caddy apikeys` subcommands to cmd.
func addSubcommands(cmd *cobra.Command) {
	dev := &cobra.Command{
		Use:   "dev-token",
		Short: "Print a dashboard JWT for local testing",
		Args:  cobra.NoArgs,
		RunE:  runDevToken,
	}
	dev.Flags().StringP("config", "c", "", "Configuration file (required)")
	dev.Flags().StringP("adapter", "a", "", "Name of config adapter to apply")
	dev.Flags().String("envfile", "", "Environment file to load before resolving placeholders")
	dev.Flags().String("owner", "dev-user", "Owner (subject) of the token")
	dev.Flags().Duration("ttl", time.Hour, "Lifetime of the token")
	cmd.AddCommand(dev)
}

func runDevToken(cmd *cobra.Command, _ []string) error {
	fl := cmd.Flags()
	configFile, _ := fl.GetString("config")
	adapter, _ := fl.GetString("adapter")
	envFile, _ := fl.GetString("envfile")
	owner, _ := fl.GetString("owner")
	ttl, _ := fl.GetDuration("ttl")
	if configFile == "" {
		return errors.New("--config is required")
	}
	if owner == "" || ttl <= 0 {
		return errors.New("--owner must not be empty and --ttl must be positive")
	}
	if envFile != "" {
		if err := loadEnvFile(envFile); err != nil {
			return err
		}
	}
	cfgJSON, _, _, err := caddycmd.LoadConfig(configFile, adapter)
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
	var root any
	if err := json.Unmarshal(cfgJSON, &root); err != nil {
		return nil, err
	}
	var found *DashboardJWT
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "apikeys" && found == nil {
				if raw, ok := v["dashboard_jwt"]; ok {
					b, _ := json.Marshal(raw)
					var c DashboardJWT
					if json.Unmarshal(b, &c) == nil && c.Secret != "" {
						found = &c
					}
				}
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
		return nil, errors.New("no apikeys handler with a dashboard_jwt secret in this config (dev-token signs HMAC tokens only)")
	}
	return found, nil
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
