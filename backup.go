package apikeys

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// Backup and restore of the file store.
//
// A bbolt file is open in one process at a time, so a backup while Caddy
// runs goes through Caddy: the admin API route GET /apikeys/backup writes a
// consistent snapshot of the open file (one bbolt read transaction; writers
// are not held up). With Caddy stopped, `caddy apikeys backup` reads the file
// itself. Restore replaces the file and needs Caddy stopped.

func init() {
	caddy.RegisterModule(adminBackup{})
}

// backupRoute is the admin API path of the snapshot.
const backupRoute = "/apikeys/backup"

// adminBackup is the admin API module `admin.api.apikeys`: GET
// /apikeys/backup[?path=<store file>] answers a consistent snapshot of a
// file store this Caddy has open (the only one, when path is omitted).
// The admin API is as trusted as the config it can replace; the snapshot
// holds key digests and sealed idempotency results, no raw key.
type adminBackup struct{}

// CaddyModule returns the Caddy module information.
func (adminBackup) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.apikeys",
		New: func() caddy.Module { return new(adminBackup) },
	}
}

// Routes returns the admin routes of the module.
func (adminBackup) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: backupRoute, Handler: caddy.AdminHandlerFunc(serveBackup)}}
}

func serveBackup(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed; use GET")}
	}
	key := ""
	if p := r.URL.Query().Get("path"); p != "" {
		key = "file:" + filepath.Clean(p)
	} else {
		var open []string
		stores.Range(func(k, _ any) bool {
			if s, _ := k.(string); strings.HasPrefix(s, "file:") {
				open = append(open, s)
			}
			return true
		})
		if len(open) != 1 {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest,
				Err: fmt.Errorf("%d file stores are open; name one with ?path=", len(open))}
		}
		key = open[0]
	}
	// Hold a reference, so a config unload cannot close the store midway.
	v, _, err := stores.LoadOrNew(key, func() (caddy.Destructor, error) {
		return nil, errors.New("not open")
	})
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound,
			Err: fmt.Errorf("no file store open at %s in this Caddy", strings.TrimPrefix(key, "file:"))}
	}
	defer func() { _, _ = stores.Delete(key) }()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Cache-Control", "no-store")
	// With the length announced, a copy cut short is an error for the
	// client, never a shorter file.
	size := func(n int64) { w.Header().Set("Content-Length", strconv.FormatInt(n, 10)) }
	if _, err := v.(*pooledStore).Store.(*keystore.CachedStore).Snapshot(w, size); err != nil {
		// The status is sent; the client sees a short body.
		caddy.Log().Named("admin.api.apikeys").Error("snapshot of the key store failed midway")
		return nil
	}
	return nil
}

// addBackupCommands adds `backup` and `restore` to cmd.
func addBackupCommands(cmd *cobra.Command, configFlags func(*cobra.Command)) {
	backup := &cobra.Command{
		Use:   "backup <file>",
		Short: "Write a consistent copy of the file store to <file>, also while Caddy runs",
		Long: `Writes a consistent copy of the config's file store (bbolt) to <file>,
mode 0600. While Caddy runs with the store open, the copy is taken through
its admin API (the config's admin address); otherwise from the file.

The keys validate only with the secret they were minted under: keep the
config's secret (or the generated secret file beside the store) too, apart
from the copy. Redis stores are backed up with Redis (RDB or AOF files).`,
		Args: cobra.ExactArgs(1),
		RunE: runBackup,
	}
	configFlags(backup)
	restore := &cobra.Command{
		Use:   "restore <file>",
		Short: "Replace the file store with a copy made by backup; Caddy must be stopped",
		Long: `Checks that <file> is a key store copy made by backup, then replaces the
config's file store with it. Caddy must be stopped (the file is locked while
it runs); start it afterwards, with the same secret as when the copy was made.`,
		Args: cobra.ExactArgs(1),
		RunE: runRestore,
	}
	configFlags(restore)
	cmd.AddCommand(backup, restore)
}

// fileStoreOf returns the config's first apikeys handler and the path of
// its file store.
func fileStoreOf(cfgJSON []byte) (*Handler, string, error) {
	raw, err := findHandlerJSON(cfgJSON, func(map[string]any) bool { return true })
	if err != nil {
		return nil, "", err
	}
	h := new(Handler)
	if err := json.Unmarshal(raw, h); err != nil {
		return nil, "", fmt.Errorf("decoding the apikeys handler config: %w", err)
	}
	cfg := h.Store
	if cfg == nil {
		cfg = &StoreConfig{}
	}
	if cfg.Type != "" && cfg.Type != "file" {
		return nil, "", fmt.Errorf("the store is %s; backup and restore are for the file store (back up Redis with its RDB or AOF files)", cfg.Type)
	}
	p, err := storeFilePath(cfg, caddy.NewReplacer())
	return h, p, err
}

func runBackup(cmd *cobra.Command, args []string) error {
	cfgJSON, err := loadCommandConfig(cmd)
	if err != nil {
		return err
	}
	h, storePath, err := fileStoreOf(cfgJSON)
	if err != nil {
		return err
	}
	dst, err := filepath.Abs(args[0])
	if err != nil {
		return err
	}
	if dst == storePath {
		return errors.New("the copy cannot replace the store file itself")
	}
	via := "the file"
	size, err := writeAtomically(dst, func(f *os.File) (int64, error) {
		n, err := keystore.SnapshotBoltFile(storePath, f, 500*time.Millisecond)
		if err == nil || !isLocked(err) {
			return n, err
		}
		// A running Caddy holds the file: ask it.
		if _, serr := f.Seek(0, io.SeekStart); serr != nil {
			return 0, serr
		}
		if terr := f.Truncate(0); terr != nil {
			return 0, terr
		}
		via = "the running Caddy's admin API"
		configFile, _ := cmd.Flags().GetString("config")
		return snapshotThroughAdmin(cfgJSON, configFile, storePath, f)
	})
	if err != nil {
		return err
	}
	info, err := keystore.InspectBolt(dst, time.Second)
	if err != nil {
		_ = os.Remove(dst)
		return fmt.Errorf("the copy is not a complete key store, removed it: %w", err)
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "backed up %d keys (%d bytes) from %s to %s, through %s\n", info.Keys, size, storePath, dst, via)
	if h.Secret == "" {
		fmt.Fprintf(out, "keep a copy of %s too: the keys validate only with that secret\n", filepath.Join(filepath.Dir(storePath), "secret"))
	}
	return nil
}

// snapshotThroughAdmin fetches the snapshot of storePath from the admin API
// of the Caddy running cfgJSON.
func snapshotThroughAdmin(cfgJSON []byte, configFile, storePath string, w io.Writer) (int64, error) {
	addr, err := caddycmd.DetermineAdminAPIAddress("", cfgJSON, configFile, "")
	if err != nil {
		return 0, err
	}
	resp, err := caddycmd.AdminAPIRequest(addr, http.MethodGet, backupRoute+"?path="+url.QueryEscape(storePath), nil, nil)
	if err != nil {
		return 0, fmt.Errorf("%s is held by another process, and asking the admin API at %s for a copy failed (stop Caddy, or give it an admin endpoint): %w", storePath, addr, err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(w, resp.Body)
	if err == nil && n != resp.ContentLength {
		err = fmt.Errorf("the admin API sent %d of %d bytes", n, resp.ContentLength)
	}
	return n, err
}

func runRestore(cmd *cobra.Command, args []string) error {
	src, err := filepath.Abs(args[0])
	if err != nil {
		return err
	}
	info, err := keystore.InspectBolt(src, time.Second)
	if err != nil {
		return fmt.Errorf("%s cannot be restored: %w", src, err)
	}
	cfgJSON, err := loadCommandConfig(cmd)
	if err != nil {
		return err
	}
	h, storePath, err := fileStoreOf(cfgJSON)
	if err != nil {
		return err
	}
	secretFile := filepath.Join(filepath.Dir(storePath), "secret")
	if _, serr := os.Stat(secretFile); h.Secret == "" && serr != nil {
		return fmt.Errorf("the config sets no secret and there is no %s: the restored keys would not validate; copy the secret file kept beside the backed-up store there first, or set secret in the config", secretFile)
	}
	release, err := keystore.LockBolt(storePath, 500*time.Millisecond)
	if err != nil {
		return fmt.Errorf("stop Caddy first: %w", err)
	}
	defer func() { _ = release() }()
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if _, err := writeAtomically(storePath, func(f *os.File) (int64, error) { return io.Copy(f, in) }); err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "restored %d keys from %s into %s; start Caddy to use them\n", info.Keys, src, storePath)
	return nil
}

// writeAtomically writes dst (mode 0600) through a temporary file in its
// directory, synced and renamed into place, so dst is never half written.
func writeAtomically(dst string, write func(*os.File) (int64, error)) (int64, error) {
	dir := filepath.Dir(dst)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".*")
	if err != nil {
		return 0, err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename, there is nothing to remove
	n, err := write(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return 0, err
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return n, nil
}

// Interface guard.
var _ caddy.AdminRouter = adminBackup{}
