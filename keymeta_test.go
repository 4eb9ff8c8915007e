package apikeys

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestParseMeta: the canonical form is compact, ASCII-only JSON that
// decodes to the same value; shape and size limits are inclusive.
func TestParseMeta(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{`{}`, `{}`},
		{` { "a" : 1 , "b" : [ true , null ] } `, `{"a":1,"b":[true,null]}`},
		{`{"ü":"Zürich 😀"}`, `{"\u00fc":"Z\u00fcrich \ud83d\ude00"}`},
		{`{"x":"a\u007fb` + "\x7f" + `"}`, `{"x":"a\u007fb\u007f"}`},
		{`{"h":"<b>&amp;</b>"}`, `{"h":"\u003cb\u003e\u0026amp;\u003c/b\u003e"}`},
		{`{"e":"\u2028\n\"\\"}`, `{"e":"\u2028\n\"\\"}`},
		{`{"a":{"b":{"c":"deepest"}}}`, `{"a":{"b":{"c":"deepest"}}}`},
		{`{"a":[{"b":1}],"c":{"a":1}}`, `{"a":[{"b":1}],"c":{"a":1}}`},
	} {
		got, aerr := parseMeta(json.RawMessage(c.in))
		if aerr != nil || string(got) != c.want {
			t.Errorf("%s: %s %v, want %s", c.in, got, aerr, c.want)
			continue
		}
		var a, b any
		if json.Unmarshal([]byte(c.in), &a) != nil || json.Unmarshal(got, &b) != nil || !jsonEqual(a, b) {
			t.Errorf("%s: canonical form %s decodes to another value", c.in, got)
		}
		for i := 0; i < len(got); i++ {
			if got[i] < 0x20 || got[i] > 0x7e {
				t.Errorf("%s: byte %#x in %s", c.in, got[i], got)
			}
		}
		// Stored as encoding/json writes it: the same bytes.
		if again, _ := json.Marshal(json.RawMessage(got)); string(again) != string(got) {
			t.Errorf("%s: encoding/json stores %s, not %s", c.in, again, got)
		}
	}
	exact := `{"s":"` + strings.Repeat("x", maxMetaBytes-8) + `"}`
	if _, aerr := parseMeta(json.RawMessage(exact)); aerr != nil {
		t.Errorf("exactly %d bytes: %v", maxMetaBytes, aerr.message)
	}
	for _, in := range []string{`null`, `[]`, `"s"`, `1`, `{"a":{"b":{"c":{}}}}`, `{"a":[[[]]]}`,
		`{"a":1,"a":1}`, `{"o":{"k":1,"k":2}}`, `{"s":"` + strings.Repeat("x", maxMetaBytes-7) + `"}`,
		`{"s":"` + strings.Repeat("é", maxMetaBytes/6) + `"}`} {
		if got, aerr := parseMeta(json.RawMessage(in)); aerr == nil || aerr.field != "meta" || aerr.code != "validation_error" {
			t.Errorf("%.50s: accepted as %.50s", in, got)
		}
	}
	// Duplicate names in different objects are fine.
	if _, aerr := parseMeta(json.RawMessage(`{"a":{"k":1},"b":{"k":1},"k":[{"k":1},{"k":2}]}`)); aerr != nil {
		t.Errorf("same name in sibling objects: %s", aerr.message)
	}
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}
