package keystore

import "context"

// DefaultListScan is how many records [ListFiltered] reads at most per call
// when its caller gives no bound: enough to fill a page of a common filter
// at once, small enough that a listing costs about the same for an owner
// with ten keys and for one with a hundred thousand revoked ones.
const DefaultListScan = 50

// maxListSkip bounds how many index entries without a record (keys deleted
// by retention, interrupted Creates) one List call walks past before it
// returns what it found, with a cursor to go on from. Each is cheap, and the
// Redis store removes them as it goes, but a listing must not walk an
// unbounded number of them.
const maxListSkip = 1000

// maxFilteredCalls bounds the List calls of one ListFiltered.
const maxFilteredCalls = 4

// ListFiltered returns up to limit of owner's keys for which keep returns
// true, newest first, starting after cursor (see [Store.List]), and the
// cursor to continue from ("" when the owner has no further keys).
//
// It reads at most max(scan, limit) records from s (scan <= 0 means
// [DefaultListScan]), so its cost does not grow with the owner's history.
// When that budget runs out before the page is full it returns the keys
// found so far, possibly none, with a cursor right after the last record it
// read: a page may hold fewer than limit keys although more follow, and
// only an empty cursor means the end. Pages are as stable as those of
// [Store.List]: no duplicates, no gaps.
func ListFiltered(ctx context.Context, s Store, owner, cursor string, limit, scan int, keep func(*Key) bool) ([]*Key, string, error) {
	if err := checkLimit(limit); err != nil {
		return nil, "", err
	}
	if scan <= 0 {
		scan = DefaultListScan
	}
	budget := max(scan, limit)
	var out []*Key
	for call := 0; ; call++ {
		if call == maxFilteredCalls {
			// Only pages of skipped entries (see maxListSkip) get here.
			return out, cursor, nil
		}
		if err := ctx.Err(); err != nil {
			return nil, "", err
		}
		keys, next, err := s.List(ctx, owner, cursor, min(budget, MaxListLimit))
		if err != nil {
			return nil, "", err
		}
		budget -= len(keys)
		for i, k := range keys {
			if !keep(k) {
				continue
			}
			out = append(out, k)
			if len(out) == limit {
				if i < len(keys)-1 || next != "" {
					return out, CursorAfter(k), nil
				}
				return out, "", nil
			}
		}
		if next == "" {
			return out, "", nil
		}
		if budget <= 0 {
			// Out of budget: go on after the last record read.
			return out, next, nil
		}
		cursor = next
	}
}
