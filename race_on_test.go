//go:build race

package apikeys

const raceEnabled = true
