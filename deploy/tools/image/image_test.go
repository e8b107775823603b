package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
)

const epoch = 1700000000

// needDebian skips a test when this machine lacks the Debian files the image takes.
func needDebian(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("the image takes iptables-legacy-save from a Debian machine; this is " + runtime.GOOS)
	}
	for _, f := range []string{"/usr/sbin/xtables-legacy-multi", "/usr/share/ca-certificates/mozilla"} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("%s is absent: the image takes it from Debian's iptables and ca-certificates packages (make deps installs them)", f)
		}
	}
	if _, err := exec.LookPath("dpkg-query"); err != nil {
		t.Skip("dpkg-query is absent: the image lists the Debian packages it takes files from")
	}
}

func options(dir string) Options {
	return Options{
		Src: "../../..", Arch: runtime.GOARCH, Iptables: true, Version: "v0.0.0-test", Revision: "abcdef0", Epoch: epoch,
		Out: filepath.Join(dir, "image"), Archive: filepath.Join(dir, "image.tar"), DigestFile: filepath.Join(dir, "image.digest"),
	}
}

var (
	builtOnce sync.Once
	built     Options
	builtHash v1.Hash
	builtErr  error
)

// buildOnce builds the image once for the tests that look into it.
func buildOnce(t *testing.T) (Options, v1.Hash) {
	t.Helper()
	needDebian(t)
	builtOnce.Do(func() {
		dir, err := os.MkdirTemp("", "endpointlag-image-test")
		if err != nil {
			builtErr = err
			return
		}
		built = options(dir)
		builtHash, builtErr = Build(built, io.Discard)
	})
	if builtErr != nil {
		t.Fatal(builtErr)
	}
	return built, builtHash
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.Out != "" {
		_ = os.RemoveAll(filepath.Dir(built.Out))
	}
	os.Exit(code)
}

// make image twice makes the same image: the daemon built twice, the layers, the config, the
// layout and its archive are the same bytes.
func TestReproducible(t *testing.T) {
	first, digest := buildOnce(t)
	second := options(t.TempDir())
	digest2, err := Build(second, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if digest != digest2 {
		t.Errorf("two builds made %s and %s", digest, digest2)
	}
	for _, f := range []func(Options) string{
		func(o Options) string { return o.Archive },
		func(o Options) string { return o.DigestFile },
	} {
		a, errA := os.ReadFile(f(first))
		b, errB := os.ReadFile(f(second))
		if err := errors.Join(errA, errB); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s and %s differ", f(first), f(second))
		}
	}
	if b, _ := os.ReadFile(second.DigestFile); string(b) != digest2.String()+"\n" {
		t.Errorf("the digest file holds %q, want %s", b, digest2)
	}
}

// The image: its config, and layers that hold the daemon, iptables-legacy-save with everything
// it loads, no shell, every file owned by root and dated SOURCE_DATE_EPOCH.
func TestImage(t *testing.T) {
	o, digest := buildOnce(t)
	idx, err := layout.ImageIndexFromPath(o.Out)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Digest != digest || im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != o.Version {
		t.Fatalf("the layout's index %+v: want one image, %s, named %s", im.Manifests, digest, o.Version)
	}
	img, err := idx.Image(digest)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Config.Entrypoint, []string{"/endpointlag"}) || cfg.Config.User != "0" || cfg.OS != "linux" || cfg.Architecture != o.Arch {
		t.Errorf("config: entrypoint %q, user %q, platform %s/%s", cfg.Config.Entrypoint, cfg.Config.User, cfg.OS, cfg.Architecture)
	}
	if !cfg.Created.Equal(time.Unix(epoch, 0)) || cfg.Config.Labels["org.opencontainers.image.version"] != o.Version ||
		cfg.Config.Labels["org.opencontainers.image.revision"] != o.Revision {
		t.Errorf("config: created %s, labels %v", cfg.Created, cfg.Config.Labels)
	}

	files := map[string]*tar.Header{}
	contents := map[string][]byte{}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		var names []string
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			name := "/" + strings.TrimSuffix(h.Name, "/")
			names = append(names, name)
			if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" || !h.ModTime.Equal(time.Unix(epoch, 0)) {
				t.Errorf("%s: owner %d:%d %q:%q, time %s", name, h.Uid, h.Gid, h.Uname, h.Gname, h.ModTime)
			}
			files[name] = h
			if h.Typeflag == tar.TypeReg {
				if contents[name], err = io.ReadAll(tr); err != nil {
					t.Fatal(err)
				}
			}
		}
		rc.Close()
		if !slices.IsSorted(names) {
			t.Error("a layer's entries are not sorted")
		}
	}
	if h := files["/endpointlag"]; h == nil || h.Mode&0o111 == 0 {
		t.Fatal("no executable /endpointlag")
	}
	for name := range files {
		if base := path.Base(name); base == "sh" || base == "bash" || base == "dash" || base == "busybox" {
			t.Errorf("the image has a shell: %s", name)
		}
	}
	root := &tree{files: files}
	for _, want := range append(slices.Clone(legacySave), "/etc/ssl/certs/ca-certificates.crt", "/etc/passwd") {
		if _, err := root.resolve(want); err != nil {
			t.Errorf("%s: %v", want, err)
		}
	}

	// Every ELF file's libraries and loader are in the image (resolved inside it, not here).
	ma := multiarch[o.Arch]
	elves := 0
	for name, data := range contents {
		f, err := elf.NewFile(bytes.NewReader(data))
		if err != nil {
			continue
		}
		elves++
		libs, _ := f.ImportedLibraries()
		for _, lib := range libs {
			found := false
			for _, d := range libDirs(ma.triplet) {
				if _, err := root.resolve(path.Join(d, lib)); err == nil {
					found = true
					break
				}
			}
			if !found {
				t.Errorf("%s needs %s, which the image lacks", name, lib)
			}
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				b, _ := io.ReadAll(p.Open())
				if interp := string(bytes.TrimRight(b, "\x00")); !root.exists(interp) {
					t.Errorf("%s's loader %s is not in the image", name, interp)
				}
			}
		}
		f.Close()
	}
	if elves < 100 {
		t.Errorf("%d ELF files, want xtables-legacy-multi, its extensions and libraries", elves)
	}

	// iptables-legacy-save runs from the image's files (its version needs no privilege).
	dir := t.TempDir()
	for name, h := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		switch h.Typeflag {
		case tar.TypeReg:
			err = os.WriteFile(p, contents[name], os.FileMode(h.Mode)&0o777)
		case tar.TypeSymlink:
			target := h.Linkname
			if path.IsAbs(target) {
				target = filepath.Join(dir, target) // inside the extracted image, not this machine
			}
			err = os.Symlink(target, p)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	loader, err := root.resolve("/lib64/ld-linux-x86-64.so.2")
	if o.Arch != "amd64" {
		loader, err = root.resolve("/lib/ld-linux-aarch64.so.1")
	}
	if err != nil {
		t.Fatal(err)
	}
	multi, _ := root.resolve(legacySave[0])
	out, err := exec.Command(filepath.Join(dir, loader), "--library-path", filepath.Join(dir, "usr/lib", ma.triplet),
		"--argv0", "iptables-legacy-save", filepath.Join(dir, multi), "--version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "legacy") {
		t.Errorf("iptables-legacy-save --version from the image: %v: %s", err, out)
	}
}

// tree resolves paths inside a layer's entries, following its symbolic links there.
type tree struct{ files map[string]*tar.Header }

func (t *tree) exists(p string) bool { _, err := t.resolve(p); return err == nil }

func (t *tree) resolve(p string) (string, error) {
	for hops := 0; hops < 40; hops++ {
		parts := strings.Split(strings.TrimPrefix(path.Clean(p), "/"), "/")
		cur, moved := "/", false
		for i, part := range parts {
			next := path.Join(cur, part)
			h := t.files[next]
			if h == nil {
				return "", errors.New("not in the image")
			}
			if h.Typeflag == tar.TypeSymlink {
				target := h.Linkname
				if !path.IsAbs(target) {
					target = path.Join(cur, target)
				}
				p, moved = path.Join(append([]string{target}, parts[i+1:]...)...), true
				break
			}
			cur = next
		}
		if !moved {
			return cur, nil
		}
	}
	return "", errors.New("too many symbolic links")
}
