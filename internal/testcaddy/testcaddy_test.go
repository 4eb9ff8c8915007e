package testcaddy

import (
	"fmt"
	"io"
	"net/http"
	"testing"
)

func TestStartServesAndStops(t *testing.T) {
	port := FreePort(t)
	p := Start(t, fmt.Sprintf("{\n\tadmin off\n}\nhttp://127.0.0.1:%d {\n\trespond \"hello\"\n}\n", port), []string{fmt.Sprintf("127.0.0.1:%d", port)})
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hello" {
		t.Fatalf("body %q", body)
	}
	p.Stop()
	if _, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", port)); err == nil {
		t.Fatal("still serving after Stop")
	}
}
