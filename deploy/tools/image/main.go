// Command image builds endpointlag's container image without a container runtime, reproducibly:
// the same sources and the same Debian packages on the build machine make the same image digest.
//
// It builds the daemon (CGO_ENABLED=0, -trimpath, the version and revision in -ldflags) and puts
// into an OCI image layout, in two layers:
//
//   - what the iptables probe runs on a node whose kube-proxy uses iptables' legacy backend:
//     iptables-legacy-save and ip6tables-legacy-save (links to xtables-legacy-multi), the xtables
//     extensions they load to print rules (libxt_*.so...), every shared library those need and
//     the ELF loader, all taken from this Debian machine as its packages installed them, with
//     their copyright files and a list of the packages and versions; Mozilla's CA certificates
//     (Debian's ca-certificates) for OTLP endpoints on HTTPS; an /etc/passwd and /etc/group
//     naming root and nobody. No shell, no package manager. (nftables and iptables-nft are read
//     over netlink: no binary; the eBPF object is inside the daemon.)
//   - the daemon, /endpointlag, the entrypoint.
//
// Every file is owned by root, dated SOURCE_DATE_EPOCH (default: the last commit's time), in
// sorted order; the config's dates are the same, and nothing records when the build ran.
//
//	cd deploy/tools && go run ./image -src ../.. -out ../../bin/image -digest-file ../../bin/image.digest
//
// docs/install.md says how to push the layout to a registry.
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Options say what to build and where.
type Options struct {
	// Src is the repository's root, whose ./cmd/endpointlag is built; or Binary, a daemon built
	// already (for linux/Arch, CGO_ENABLED=0).
	Src, Binary string
	// Arch is the image's architecture (amd64 or arm64); the iptables files come from this
	// machine, so they must be of the same architecture, or left out (Iptables false).
	Arch     string
	Iptables bool
	// Version and Revision go into the daemon (-X main.version, main.revision) and the labels.
	Version, Revision string
	// Epoch dates every file and the config (SOURCE_DATE_EPOCH).
	Epoch int64
	// Out is the OCI image layout directory to write (replaced); Archive, if set, a tar of it
	// (an oci-archive); DigestFile, if set, gets the manifest's digest.
	Out, Archive, DigestFile string
}

func main() {
	var o Options
	flag.StringVar(&o.Src, "src", "../..", "the repository's root: ./cmd/endpointlag is built from it")
	flag.StringVar(&o.Binary, "binary", "", "use this daemon binary (built with CGO_ENABLED=0 for linux/-arch) instead of building one from -src")
	flag.StringVar(&o.Arch, "arch", runtime.GOARCH, "the image's architecture: amd64 or arm64 (the iptables files are this machine's: build on a machine of that architecture, or -iptables=false)")
	flag.BoolVar(&o.Iptables, "iptables", true, "include iptables-legacy-save and what it needs, for nodes whose kube-proxy uses iptables' legacy backend")
	flag.StringVar(&o.Version, "version", "", "the version (default: git describe --tags --always --dirty in -src)")
	flag.StringVar(&o.Revision, "revision", "", "the revision (default: git rev-parse --short HEAD in -src)")
	epoch := flag.String("source-date-epoch", os.Getenv("SOURCE_DATE_EPOCH"), "the time of every file and of the config, in seconds since 1970 (default $SOURCE_DATE_EPOCH, else the last commit's time)")
	flag.StringVar(&o.Out, "out", "../../bin/image", "the OCI image layout directory to write (replaced)")
	flag.StringVar(&o.Archive, "archive", "", "also write the layout as one tar file (oci-archive), e.g. ../../bin/image.tar")
	flag.StringVar(&o.DigestFile, "digest-file", "", "write the image's digest (sha256:...) to this file, e.g. ../../bin/image.digest")
	flag.Parse()
	o.Version = orGit(o.Version, o.Src, "describe", "--tags", "--always", "--dirty")
	o.Revision = orGit(o.Revision, o.Src, "rev-parse", "--short", "HEAD")
	if *epoch == "" {
		*epoch = orGit("", o.Src, "log", "-1", "--format=%ct")
	}
	var err error
	if o.Epoch, err = strconv.ParseInt(strings.TrimSpace(*epoch), 10, 64); err != nil {
		fmt.Fprintf(os.Stderr, "image: -source-date-epoch %q: %v\n", *epoch, err)
		os.Exit(2)
	}
	digest, err := Build(o, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "image: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(digest)
}

// orGit returns v, or the output of git args in dir ("unknown" when git cannot tell).
func orGit(v, dir string, args ...string) string {
	if v != "" {
		return v
	}
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil || len(bytes.TrimSpace(out)) == 0 {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// Build builds the image into o.Out (and o.Archive, o.DigestFile) and returns its digest.
func Build(o Options, log io.Writer) (v1.Hash, error) {
	if _, ok := multiarch[o.Arch]; !ok {
		return v1.Hash{}, fmt.Errorf("-arch %q: amd64 or arm64", o.Arch)
	}
	mtime := time.Unix(o.Epoch, 0).UTC()
	bin := o.Binary
	if bin == "" {
		dir, err := os.MkdirTemp("", "endpointlag-image")
		if err != nil {
			return v1.Hash{}, err
		}
		defer os.RemoveAll(dir)
		bin = filepath.Join(dir, "endpointlag")
		if err := buildDaemon(o, bin); err != nil {
			return v1.Hash{}, err
		}
	}
	system, err := systemLayer(o)
	if err != nil {
		return v1.Hash{}, err
	}
	daemon := rootfs{}
	b, err := os.ReadFile(bin)
	if err != nil {
		return v1.Hash{}, err
	}
	daemon.addFile("/endpointlag", b, 0o755)

	created := v1.Time{Time: mtime}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range []struct {
		fs  rootfs
		doc string
	}{
		{system, "iptables-legacy-save with its extensions and libraries (Debian), CA certificates, passwd"},
		{daemon, "endpointlag " + o.Version},
	} {
		tb, err := l.fs.tarball(mtime)
		if err != nil {
			return v1.Hash{}, err
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(tb)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return v1.Hash{}, err
		}
		img, err = mutate.Append(img, mutate.Addendum{Layer: layer, MediaType: types.OCILayer,
			History: v1.History{Created: created, CreatedBy: "deploy/tools/image", Comment: l.doc}})
		if err != nil {
			return v1.Hash{}, err
		}
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return v1.Hash{}, err
	}
	cfg = cfg.DeepCopy()
	cfg.Architecture = o.Arch
	cfg.OS = "linux"
	cfg.Created = created
	cfg.Config = v1.Config{
		Entrypoint: []string{"/endpointlag"},
		// Root: the daemon adds capabilities (the DaemonSet drops all others); the aggregator's
		// Deployment runs it as nobody.
		User: "0",
		Env:  []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
		Labels: map[string]string{
			"org.opencontainers.image.title":       "endpointlag",
			"org.opencontainers.image.description": "Measures how long a terminating pod's endpoint keeps receiving traffic after its deletion, stage by stage, on every node",
			"org.opencontainers.image.version":     o.Version,
			"org.opencontainers.image.revision":    o.Revision,
			"org.opencontainers.image.created":     mtime.Format(time.RFC3339),
		},
	}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return v1.Hash{}, err
	}
	digest, err := img.Digest()
	if err != nil {
		return v1.Hash{}, err
	}
	if err := writeLayout(o.Out, img, o); err != nil {
		return v1.Hash{}, err
	}
	if o.Archive != "" {
		if err := writeArchive(o.Out, o.Archive, mtime); err != nil {
			return v1.Hash{}, err
		}
	}
	if o.DigestFile != "" {
		if err := os.WriteFile(o.DigestFile, []byte(digest.String()+"\n"), 0o644); err != nil {
			return v1.Hash{}, err
		}
	}
	fmt.Fprintf(log, "image: %s (%s/%s, %s) in %s\n", digest, "linux", o.Arch, o.Version, o.Out)
	return digest, nil
}

// buildDaemon builds ./cmd/endpointlag of o.Src as the repository's Makefile does, statically and
// without paths or VCS stamps of this machine.
func buildDaemon(o Options, out string) error {
	ldflags := fmt.Sprintf("-s -w -X main.version=%s -X main.revision=%s", o.Version, o.Revision)
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-ldflags", ldflags, "-o", out, "./cmd/endpointlag")
	cmd.Dir = o.Src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+o.Arch, "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/endpointlag: %w\n%s", err, b)
	}
	return nil
}

// legacySave are the commands the iptables probe runs (probes/iptables: legacySave).
var legacySave = []string{"/usr/sbin/iptables-legacy-save", "/usr/sbin/ip6tables-legacy-save"}

// systemLayer is everything but the daemon.
func systemLayer(o Options) (rootfs, error) {
	fs := rootfs{}
	fs.addFile("/etc/passwd", []byte("root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n"), 0o644)
	fs.addFile("/etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
	fs.addDir("/tmp", 0o1777)
	if o.Iptables {
		if o.Arch != runtime.GOARCH {
			return nil, fmt.Errorf("-arch %s: the iptables files come from this machine, which is %s: build an %s image on an %s machine, or leave them out (-iptables=false)",
				o.Arch, runtime.GOARCH, o.Arch, o.Arch)
		}
		files := append([]string(nil), legacySave...)
		ext, _ := filepath.Glob("/usr/lib/" + multiarch[o.Arch].triplet + "/xtables/*.so")
		if len(ext) == 0 {
			return nil, fmt.Errorf("no xtables extensions in /usr/lib/%s/xtables: install Debian's iptables", multiarch[o.Arch].triplet)
		}
		// The extensions (dlopened, so no DT_NEEDED names them) print the rules' matches and targets.
		if err := fs.addELFClosure(append(files, ext...), o.Arch); err != nil {
			return nil, fmt.Errorf("%w (install Debian's iptables)", err)
		}
	}
	// Mozilla's roots as Debian's ca-certificates ships them, in a fixed order: not this machine's
	// /etc/ssl/certs, which may hold local additions.
	certs, _ := filepath.Glob("/usr/share/ca-certificates/mozilla/*.crt")
	if len(certs) == 0 {
		return nil, fmt.Errorf("no /usr/share/ca-certificates/mozilla/*.crt: install Debian's ca-certificates")
	}
	var bundle []byte
	for _, c := range certs { // Glob sorts
		b, err := os.ReadFile(c)
		if err != nil {
			return nil, err
		}
		bundle = append(append(bundle, bytes.TrimRight(b, "\n")...), '\n')
	}
	fs.addFile("/etc/ssl/certs/ca-certificates.crt", bundle, 0o644)
	pkgs, copyrights, err := debianPackages(withHost(fs, certs[0])) // certs[0]: for ca-certificates' copyright
	if err != nil {
		return nil, err
	}
	for _, c := range copyrights {
		if err := fs.addHost(c); err != nil {
			return nil, err
		}
	}
	fs.addFile("/usr/share/doc/endpointlag-image/debian-packages", []byte(strings.Join(pkgs, "\n")+"\n"), 0o644)
	return fs, nil
}

// withHost returns fs and one more host file, for debianPackages.
func withHost(fs rootfs, host string) rootfs {
	out := rootfs{}
	for p, e := range fs {
		out[p] = e
	}
	out[host] = entry{typ: tar.TypeReg, host: host}
	return out
}

// writeLayout writes img as the only image of a new OCI image layout at dir.
func writeLayout(dir string, img v1.Image, o Options) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	return p.AppendImage(img,
		layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": o.Version}),
		layout.WithPlatform(v1.Platform{OS: "linux", Architecture: o.Arch}))
}

// writeArchive writes the layout directory as one tar (sorted, dated mtime, owned by root).
func writeArchive(dir, file string, mtime time.Time) error {
	fs := rootfs{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			fs.addDir("/"+rel, 0o755)
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		fs.addFile("/"+rel, b, 0o644)
		return nil
	})
	if err != nil {
		return err
	}
	b, err := fs.tarball(mtime)
	if err != nil {
		return err
	}
	return os.WriteFile(file, b, 0o644)
}
