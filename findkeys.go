package apikeys

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/caddy-apikeys/caddy-apikeys/jwtauth"
	"github.com/caddy-apikeys/caddy-apikeys/keystore"
)

// maxPrefixScan bounds how many of an owner's keys one
// `GET <management_path>?prefix=` request reads. The stores index keys by
// digest, ID and owner, not by prefix, so a prefix search walks the
// owner's list; past this many keys the answer carries next_cursor to go
// on from.
var maxPrefixScan = 1000 // a variable so that tests can lower it

// isDisplayPrefix reports whether s has the form of a key's display prefix
// (key_prefix and 8 lowercase hex characters, e.g. wbk_ce03e701).
func (h *Handler) isDisplayPrefix(s string) bool {
	n := len(h.KeyPrefix) + 8
	if len(s) != n || s[:len(h.KeyPrefix)] != h.KeyPrefix {
		return false
	}
	for i := len(h.KeyPrefix); i < n; i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// serveFindPrefix answers GET <management_path>?prefix=…[&status=][&limit=][&cursor=]:
// the caller's keys with that display prefix, newest first. Several keys
// may share a prefix (8 hex characters); all are listed. At most
// maxPrefixScan keys are read per request: a page may then hold fewer than
// limit keys with a next_cursor to continue from.
func (h *Handler) serveFindPrefix(w http.ResponseWriter, r *http.Request, claims jwtauth.Claims) error {
	q := r.URL.Query()
	prefix := q.Get("prefix")
	if !h.isDisplayPrefix(prefix) {
		return writeError(w, validationError("prefix", fmt.Sprintf("`prefix` must be a key's display prefix: %s followed by 8 lowercase hex characters. Never put a whole key in a URL.", h.KeyPrefix)))
	}
	lq, aerr := parseListQuery(q)
	if aerr != nil {
		return writeError(w, aerr)
	}
	limit, status, cursor := lq.limit, lq.status, lq.cursor
	ctx, cancel := h.storeCtx(r)
	defer cancel()
	now := h.now()
	resp := listResponse{Keys: []keyView{}}
	scanned := 0
	for {
		keys, next, err := h.store.List(ctx, claims.Owner, cursor, min(keystore.MaxListLimit, maxPrefixScan-scanned))
		if errors.Is(err, keystore.ErrInvalidCursor) {
			return writeError(w, validationError("cursor", "`cursor` is not a cursor this API returned."))
		}
		if err != nil {
			h.logger.Error("listing keys failed", zap.Error(err))
			return writeError(w, errStoreUnavailable)
		}
		for i, k := range keys {
			scanned++
			more := next != "" || i < len(keys)-1
			if k.Prefix == prefix && (status == "" || k.Status(now) == status) {
				resp.Keys = append(resp.Keys, newKeyView(k, now))
			}
			if more && (len(resp.Keys) == limit || scanned == maxPrefixScan) {
				c := base64.RawURLEncoding.EncodeToString([]byte(keystore.CursorAfter(k)))
				resp.NextCursor = &c
				return writeData(w, http.StatusOK, resp)
			}
		}
		if next == "" {
			return writeData(w, http.StatusOK, resp)
		}
		cursor = next
	}
}

// foundKey is a key as `caddy apikeys find` and `get` print it: the API's
// view and its owner.
type foundKey struct {
	Owner string `json:"owner"`
	keyView
}

// findKeys returns the keys a raw key or display prefix names. A raw key
// is looked up by digest, under every secret, whoever owns it; a prefix
// needs owner, whose keys are all read (the stores have no prefix index).
func (h *Handler) findKeys(ctx context.Context, arg, owner string) ([]*keystore.Key, error) {
	switch {
	case len(arg) == keystore.KeyLen(h.KeyPrefix):
		if err := keystore.Check(h.KeyPrefix, arg); err != nil {
			return nil, fmt.Errorf("that is not a key this gateway minted: %w", err)
		}
		for _, hs := range append([]*keystore.Hasher{h.hasher}, h.oldHashers...) {
			k, err := h.store.ByDigest(ctx, hs.Digest(arg))
			if errors.Is(err, keystore.ErrNotFound) {
				continue
			}
			if err != nil {
				return nil, err
			}
			if owner != "" && k.Owner != owner {
				return nil, nil
			}
			return []*keystore.Key{k}, nil
		}
		return nil, nil
	case h.isDisplayPrefix(arg):
		if owner == "" {
			return nil, errors.New("finding by prefix needs --owner: the store indexes keys by digest, ID and owner, not by prefix (give the whole key to search every owner)")
		}
		var found []*keystore.Key
		cursor := ""
		for {
			keys, next, err := h.store.List(ctx, owner, cursor, keystore.MaxListLimit)
			if err != nil {
				return nil, err
			}
			for _, k := range keys {
				if k.Prefix == arg {
					found = append(found, k)
				}
			}
			if next == "" {
				return found, nil
			}
			cursor = next
		}
	}
	return nil, fmt.Errorf("give a whole key or its %d-character prefix (%s and 8 hex characters)", len(h.KeyPrefix)+8, h.KeyPrefix)
}

func runFind(cmd *cobra.Command, args []string) error {
	owner, _ := cmd.Flags().GetString("owner")
	asJSON, _ := cmd.Flags().GetBool("json")
	h, closeStore, err := openFromConfig(cmd)
	if err != nil {
		return err
	}
	defer closeStore()
	ctx, cancel := cmdContext()
	defer cancel()
	keys, err := h.findKeys(ctx, args[0], owner)
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return errors.New("no key found")
	}
	out := cmd.OutOrStdout()
	now := h.now()
	if asJSON {
		for _, k := range keys {
			b, _ := marshalJSON(foundKey{Owner: k.Owner, keyView: newKeyView(k, now)})
			fmt.Fprintln(out, string(b))
		}
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY_ID\tOWNER\tSTATUS\tCREATED\tPREFIX\tNAME")
	for _, k := range keys {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Owner, k.Status(now), fmtTime(&k.CreatedAt), k.Prefix, k.Name)
	}
	return tw.Flush()
}

func runGet(cmd *cobra.Command, args []string) error {
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
	b, _ := marshalJSON(foundKey{Owner: k.Owner, keyView: newKeyView(k, h.now())})
	_, err = fmt.Fprintln(cmd.OutOrStdout(), string(b))
	return err
}

// runRevokeAll revokes every key of --owner that still validates
// (offboarding) and reports how many. It reads the owner's whole list
// first, then revokes, so keys minted meanwhile are not revoked: run it
// after cutting the owner's dashboard access.
func runRevokeAll(cmd *cobra.Command, owner string) error {
	h, closeStore, err := openFromConfig(cmd)
	if err != nil {
		return err
	}
	defer closeStore()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	now := h.now()
	var live []string
	total, cursor := 0, ""
	for {
		keys, next, err := h.store.List(ctx, owner, cursor, keystore.MaxListLimit)
		if err != nil {
			return err
		}
		for _, k := range keys {
			total++
			if k.Active(now) {
				live = append(live, k.ID)
			}
		}
		if next == "" {
			break
		}
		cursor = next
	}
	at := now.UTC().Truncate(time.Millisecond)
	revoked := 0
	for _, id := range live {
		sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
		k, err := h.store.Revoke(sctx, id, at)
		scancel()
		if errors.Is(err, keystore.ErrNotFound) {
			continue // removed by retention meanwhile
		}
		if err != nil {
			return fmt.Errorf("revoked %d of %d keys of %s, then: %w", revoked, len(live), owner, err)
		}
		revoked++
		h.audit("revoked", k, zap.String("reason", "offboarding"))
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "revoked %d keys of %s (%d already revoked or expired)\n", revoked, owner, total-len(live))
	return err
}

// addOperatorCommands adds `find` and `get`.
func addOperatorCommands(cmd *cobra.Command, configFlags func(*cobra.Command)) {
	find := &cobra.Command{
		Use:   "find <key | prefix> [--owner <id>] [--json]",
		Short: "Find keys by the whole key or its display prefix",
		Long: `Finds the key a leaked string names and prints key_id, owner, status and
created_at. A whole key is looked up by its digest, whoever owns it. A display
prefix (wbk_ and 8 hex characters, as listings show it) may match several
keys, all listed; it needs --owner, since the store has no index by prefix.`,
		Args: cobra.ExactArgs(1),
		RunE: runFind,
	}
	configFlags(find)
	find.Flags().String("owner", "", "Only keys of this owner (required for a prefix)")
	find.Flags().Bool("json", false, "Print JSON lines instead of a table")

	get := &cobra.Command{
		Use:   "get <key_id>",
		Short: "Print one key (never the key itself), with its owner, as JSON",
		Args:  cobra.ExactArgs(1),
		RunE:  runGet,
	}
	configFlags(get)

	disable := &cobra.Command{
		Use:   "disable <key_id>",
		Short: "Suspend a key (403 key_disabled) without revoking it; print it as JSON",
		Long: `Disables a key, as PATCH {"enabled": false} does: every instance refuses
it with 403 key_disabled until it is enabled again. It stays live: it still
counts towards max_keys_per_owner, and keeps its expiry. A revoked or expired
key cannot be disabled or enabled.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return runSetEnabled(cmd, args[0], false) },
	}
	configFlags(disable)
	enable := &cobra.Command{
		Use:   "enable <key_id>",
		Short: "Enable a disabled key again; print it as JSON",
		Args:  cobra.ExactArgs(1),
		RunE:  func(cmd *cobra.Command, args []string) error { return runSetEnabled(cmd, args[0], true) },
	}
	configFlags(enable)
	cmd.AddCommand(find, get, disable, enable)
}

// runSetEnabled disables or enables key id, as PATCH with `enabled` does,
// and prints the key with its owner.
func runSetEnabled(cmd *cobra.Command, id string, enabled bool) error {
	h, closeStore, err := openFromConfig(cmd)
	if err != nil {
		return err
	}
	defer closeStore()
	ctx, cancel := cmdContext()
	defer cancel()
	now := h.now()
	var toggled bool
	k, err := h.store.Update(ctx, id, func(k *keystore.Key) error {
		if st := k.Status(now); st == keystore.StatusRevoked || st == keystore.StatusExpired {
			return keyNotActive(st)
		}
		toggled = k.Disabled == enabled
		k.Disabled = !enabled
		return nil
	})
	var aerr *apiError
	switch {
	case errors.Is(err, keystore.ErrNotFound):
		return fmt.Errorf("no key %q", id)
	case errors.As(err, &aerr):
		return apiErr(aerr)
	case err != nil:
		return err
	}
	if toggled {
		h.audit(map[bool]string{true: "enabled", false: "disabled"}[enabled], k)
	}
	b, _ := marshalJSON(foundKey{Owner: k.Owner, keyView: newKeyView(k, now)})
	_, err = fmt.Fprintln(cmd.OutOrStdout(), string(b))
	return err
}
