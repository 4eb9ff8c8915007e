package keystore

import (
	"strings"
	"testing"
)

// TestRedisURLHasPasswordAgreesWithClient: for URLs spelled to hide a
// password, RedisURLHasPassword finds exactly the password the client
// options carry.
func TestRedisURLHasPasswordAgreesWithClient(t *testing.T) {
	for _, raw := range []string{
		"redis://127.0.0.1:6379/0",
		"redis://:secret@127.0.0.1:6379/0",
		"redis://:secret@127.0.0.1/0?client_name={x}",
		"redis://user:secret@127.0.0.1/0",
		"redis://user@127.0.0.1/0",
		"redis://us%40er:se%3Acret@127.0.0.1/0",
		"rediss://:secret@127.0.0.1:6380",
		"redis+sentinel://127.0.0.1:26379/m",
		"redis+sentinel://user@127.0.0.1:26379/m",
		"redis+sentinel://user@x:secret@127.0.0.1:26379/m",
		"redis+sentinel://:secret@127.0.0.1:26379,127.0.0.2/m/1",
		"redis+sentinel://a@b@c:secret@127.0.0.1/m",
		"redis+sentinel://127.0.0.1/m?sentinel_password=secret",
		"redis+sentinel://127.0.0.1/m?sentinel_username=u",
		"redis+sentinel://u:p%40ss@127.0.0.1/m?pool_size=3",
	} {
		has, err := RedisURLHasPassword(raw)
		if err != nil {
			t.Errorf("%s: %v", raw, err)
			continue
		}
		uo, err := ParseRedisOptions(RedisOptions{URLs: []string{raw}})
		if err != nil {
			t.Errorf("%s: the client refuses it: %v", raw, err)
			continue
		}
		if want := uo.Password != "" || uo.SentinelPassword != ""; has != want {
			t.Errorf("%s: RedisURLHasPassword = %v, the client has a password: %v", raw, has, want)
		}
		if has && strings.Contains(raw, "secret") && uo.Password != "secret" && uo.SentinelPassword != "secret" &&
			!strings.Contains(uo.Password, "secret") {
			t.Errorf("%s: the client reads password %q", raw, uo.Password)
		}
	}
	for _, raw := range []string{"http://127.0.0.1", "rediss+sentinel://127.0.0.1/m", "redis://[::1"} {
		if _, err := RedisURLHasPassword(raw); err == nil {
			t.Errorf("%s: no error", raw)
		} else if strings.Contains(err.Error(), "secret") {
			t.Errorf("%s: error shows the password: %v", raw, err)
		}
	}
}

// FuzzRedisURLHasPassword: whatever the URL, when the client would send a
// password (ParseRedisOptions accepts it and sets one), RedisURLHasPassword
// says so: a configuration check built on it cannot be fooled into letting
// a literal password through.
func FuzzRedisURLHasPassword(f *testing.F) {
	for _, s := range []string{
		"redis://:secret@127.0.0.1/0?client_name={x}",
		"redis+sentinel://user@x:secret@127.0.0.1/m",
		"redis+sentinel://a@b:c@d@127.0.0.1:26379,127.0.0.2/m/0?sentinel_password=p",
		"rediss://u:p@h:6380/1?pool_size=3",
		"REDIS+SENTINEL://u:p@h/m",
		"redis://u%3Ap@h",
		"redis://h?x=@y:z",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		has, herr := RedisURLHasPassword(raw)
		uo, err := ParseRedisOptions(RedisOptions{URLs: []string{raw}})
		if err != nil {
			return
		}
		if (uo.Password != "" || uo.SentinelPassword != "") && (herr != nil || !has) {
			t.Fatalf("%q: the client has a password, RedisURLHasPassword = %v, %v", raw, has, herr)
		}
	})
}
