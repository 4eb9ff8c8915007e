package apikeys

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-apikeys/caddy-apikeys/internal/testcaddy"
)

// TestBackupRestore backs up the file store of a running Caddy (through its
// admin API) and of a stopped one, restores the copy into a fresh Caddy's
// store, and checks every key there: each validates as it did at the
// backup, and a key minted after the backup does not exist.
func TestBackupRestore(t *testing.T) {
	dir := t.TempDir()
	storeLine := func(path string) string {
		return "store file " + path + "\n\t\tsecret {env.APIKEYS_TEST_SECRET}"
	}
	port, adminPort := testcaddy.FreePort(t), testcaddy.FreePort(t)
	proc := testcaddy.Start(t, operatorCaddyfile(port, adminPort, storeLine(filepath.Join(dir, "a", "keys.db")), ""),
		[]string{fmt.Sprintf("127.0.0.1:%d", port)})
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	cfgA := filepath.Join(proc.Dir(), "Caddyfile")

	var keys []createdKey
	for i := range 6 {
		body := fmt.Sprintf(`{"name":"k%d"}`, i)
		if i%2 == 1 {
			body = fmt.Sprintf(`{"name":"k%d","scopes":["analytics:read"]}`, i)
		}
		keys = append(keys, mintHTTP(t, base, "owner0", body))
	}
	req, _ := http.NewRequest("DELETE", base+"/v1/apikeys/"+keys[0].KeyID, nil)
	req.Header.Set("Authorization", "Bearer "+dashboardToken(t, "owner0"))
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("revoke: %v %v", resp, err)
	}

	run := func(args ...string) (string, error) {
		t.Helper()
		out, err := exec.Command(testcaddy.Binary(t), append([]string{"apikeys"}, args...)...).CombinedOutput()
		return string(out), err
	}
	backup := filepath.Join(dir, "backups", "keys.backup")
	out, err := run("backup", backup, "--config", cfgA)
	if err != nil || !strings.Contains(out, "backed up 6 keys") || !strings.Contains(out, "admin API") {
		t.Fatalf("backup while Caddy runs: %v\n%s", err, out)
	}
	if fi, err := os.Stat(backup); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("backup file: %v %v", fi, err)
	}
	late := mintHTTP(t, base, "owner0", `{"name":"after the backup"}`)

	// A fresh Caddy's store gets the copy; restore refuses while it runs.
	port2 := testcaddy.FreePort(t)
	cfgB := filepath.Join(dir, "b", "Caddyfile")
	caddyfileB := operatorCaddyfile(port2, 0, storeLine(filepath.Join(dir, "b", "keys.db")), "")
	if err := os.MkdirAll(filepath.Dir(cfgB), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgB, []byte(caddyfileB), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := run("restore", filepath.Join(dir, "nope"), "--config", cfgB); err == nil {
		t.Errorf("restore of a missing file: %s", out)
	}
	if out, err := run("restore", cfgB, "--config", cfgB); err == nil || !strings.Contains(out, "not a bbolt file") {
		t.Errorf("restore of a file that is no key store: %v\n%s", err, out)
	}
	out, err = run("restore", backup, "--config", cfgB)
	if err != nil || !strings.Contains(out, "restored 6 keys") {
		t.Fatalf("restore: %v\n%s", err, out)
	}
	proc2 := testcaddy.Start(t, caddyfileB, []string{fmt.Sprintf("127.0.0.1:%d", port2)})
	base2 := fmt.Sprintf("http://127.0.0.1:%d", port2)
	for i, k := range keys {
		want := 200
		if i == 0 {
			want = 401 // revoked before the backup
		}
		if got := getStatus(t, base2, "/v1/analytics/daily", k.Key); got != want {
			t.Errorf("restored key %d: %d, want %d", i, got, want)
		}
	}
	if got := getStatus(t, base2, "/v1/analytics/daily", late.Key); got != 401 {
		t.Errorf("key minted after the backup: %d, want 401", got)
	}
	if out, err := run("restore", backup, "--config", cfgB); err == nil || !strings.Contains(out, "stop Caddy first") {
		t.Errorf("restore while Caddy runs: %v\n%s", err, out)
	}

	// With Caddy stopped, backup reads the file itself.
	proc2.Stop()
	out, err = run("backup", filepath.Join(dir, "b.backup"), "--config", cfgB)
	if err != nil || !strings.Contains(out, "backed up 6 keys") || !strings.Contains(out, "through the file") {
		t.Errorf("backup with Caddy stopped: %v\n%s", err, out)
	}
}
