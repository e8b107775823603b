package main

import (
	"encoding/json"
	"fmt"
	"strings"
)

// dashboards are the files the generator writes, each beside this source.
var dashboards = []struct {
	file  string
	build func() *board
}{
	{"endpointlag-overview.json", overview},
	{"endpointlag-node.json", node},
}

// render builds a dashboard and encodes it as committed: indented JSON, keys in a fixed order
// (struct fields in declaration order, maps sorted), a final newline.
func render(build func() *board) ([]byte, error) {
	d, err := build().d.Build()
	if err != nil {
		return nil, err
	}
	out, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", *d.Uid, err)
	}
	return append(unescapeHTML(out), '\n'), nil
}

// unescapeHTML undoes encoding/json's escaping of <, > and & (the SDK's types marshal
// themselves, so an Encoder's SetEscapeHTML(false) does not reach inside them): queries keep
// their > as written, for people and for greps. The text is the same JSON value either way.
func unescapeHTML(js []byte) []byte {
	return []byte(strings.NewReplacer(`\u003c`, "<", `\u003e`, ">", `\u0026`, "&").Replace(string(js)))
}
