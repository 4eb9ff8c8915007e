package apikeys

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
)

// TestDevToken runs `caddy apikeys dev-token` on Caddyfile.example with
// example.env, as the README does, and verifies the token it prints the
// way the handler would.
func TestDevToken(t *testing.T) {
	t.Setenv("APIKEYS_DASHBOARD_SECRET", "") // must come from --envfile
	root := &cobra.Command{Use: "apikeys"}
	addSubcommands(root)
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"dev-token", "--config", "Caddyfile.example", "--envfile", "example.env", "--owner", "alice"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	token := strings.TrimSpace(out.String())

	secret := os.Getenv("APIKEYS_DASHBOARD_SECRET")
	if secret == "" {
		t.Fatal("--envfile did not load example.env")
	}
	v, err := jwtauth.New(context.Background(), jwtauth.Config{Secret: []byte(secret), Issuer: "caddy-apikeys-example"})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	claims, err := v.Verify(token)
	if err != nil {
		t.Fatalf("the dev token does not verify: %v", err)
	}
	if claims.Owner != "alice" {
		t.Errorf("owner = %q", claims.Owner)
	}

	jwksOnly := t.TempDir() + "/Caddyfile"
	cfg := ":8080 {\n\tapikeys {\n\t\tdashboard_jwt {\n\t\t\tjwks https://auth.example.com/jwks.json\n\t\t}\n\t}\n}\n"
	if err := os.WriteFile(jwksOnly, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	root.SetArgs([]string{"dev-token", "--config", jwksOnly, "--adapter", "caddyfile"})
	err = root.Execute()
	if err == nil || !strings.Contains(err.Error(), "HMAC") {
		t.Errorf("dev-token on a JWKS-only config: %v, want a refusal naming HMAC", err)
	}
}
