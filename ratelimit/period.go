package ratelimit

import "time"

// nsPerDay is the length of a UTC day: Unix time has no leap seconds.
const nsPerDay = int64(24 * time.Hour)

// dayOf returns the UTC day of the Unix time ns (nanoseconds), counted in
// days since 1970-01-01.
func dayOf(ns int64) int32 {
	d := ns / nsPerDay
	if ns < 0 && ns%nsPerDay != 0 {
		d--
	}
	return int32(d)
}

// dayTime returns 00:00:00 UTC of day d.
func dayTime(d int32) time.Time { return time.Unix(int64(d)*86400, 0).UTC() }

// periodBounds returns the start and end (exclusive), in Unix nanoseconds,
// of the quota period of kind p that holds ns.
func periodBounds(p Period, ns int64) (start, end int64) {
	switch p {
	case Day:
		start = int64(dayOf(ns)) * nsPerDay
		return start, start + nsPerDay
	case Month:
		y, m, _ := time.Unix(0, ns).UTC().Date()
		s := time.Date(y, m, 1, 0, 0, 0, 0, time.UTC)
		return s.UnixNano(), s.AddDate(0, 1, 0).UnixNano()
	}
	return 0, 0
}

// dayStamp formats day d as yyyymmdd, as Redis key names carry it.
func dayStamp(d int32) string { return dayTime(d).Format("20060102") }

// periodStamp names the quota period that starts at start (Unix ns):
// yyyymmdd for a day, yyyymm for a month.
func periodStamp(p Period, start int64) string {
	t := time.Unix(0, start).UTC()
	if p == Month {
		return t.Format("200601")
	}
	return t.Format("20060102")
}
