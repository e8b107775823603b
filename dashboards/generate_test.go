package main

import (
	"bytes"
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
)

// TestCommittedUpToDate fails when a committed dashboard differs from what the generator writes.
func TestCommittedUpToDate(t *testing.T) {
	for _, d := range dashboards {
		t.Run(d.file, func(t *testing.T) {
			want, err := render(d.build)
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(d.file)
			if err != nil {
				t.Fatalf("%v: run make generate (cd dashboards && go run .) and commit the result", err)
			}
			if !bytes.Equal(got, want) {
				line, have, should := firstDifference(got, want)
				t.Fatalf("dashboards/%s is stale: run make generate (cd dashboards && go run .) and commit the result\nfirst difference, line %d:\n committed: %s\n generated: %s",
					d.file, line, have, should)
			}
		})
	}
}

func firstDifference(a, b []byte) (line int, x, y string) {
	al, bl := strings.Split(string(a), "\n"), strings.Split(string(b), "\n")
	for i := range max(len(al), len(bl)) {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return i + 1, x, y
		}
	}
	return 0, "", ""
}

// TestDeterministic: two runs write the same bytes, and the text is the JSON value the SDK
// encodes (unescaping <, > and & changes no value).
func TestDeterministic(t *testing.T) {
	for _, d := range dashboards {
		first, err := render(d.build)
		if err != nil {
			t.Fatal(err)
		}
		second, err := render(d.build)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(first, second) {
			t.Errorf("%s: two renders differ", d.file)
		}
		built, err := d.build().d.Build()
		if err != nil {
			t.Fatal(err)
		}
		plain, err := json.Marshal(built)
		if err != nil {
			t.Fatal(err)
		}
		var written, encoded any
		if err := json.Unmarshal(first, &written); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(plain, &encoded); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(written, encoded) {
			t.Errorf("%s: the written JSON is not the value the SDK encodes", d.file)
		}
	}
}

// TestStableUIDs: each file's uid is its name, so links and provisioning survive regeneration.
func TestStableUIDs(t *testing.T) {
	for file, d := range committed(t) {
		if want := strings.TrimSuffix(file, ".json"); d.UID != want {
			t.Errorf("%s: uid %q, want %q", file, d.UID, want)
		}
	}
}
