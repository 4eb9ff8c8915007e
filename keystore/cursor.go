package keystore

// CursorAfter returns the List cursor that continues right after k, so a
// caller that shows only part of a page (after filtering, say) can resume
// exactly behind the last key it showed.
func CursorAfter(k *Key) string { return indexMember(k) }
