// Command caddy is Caddy with its standard modules and the apikeys handler,
// the same program `xcaddy build --with github.com/caddy-apikeys/caddy-apikeys`
// produces. Run it from the repository root with `go run ./cmd/caddy`.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-apikeys/caddy-apikeys"
)

func main() {
	caddycmd.Main()
}
