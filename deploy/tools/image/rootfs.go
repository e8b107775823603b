package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// entry is one file, directory or symbolic link of a layer.
type entry struct {
	typ  byte   // tar.TypeReg, tar.TypeDir or tar.TypeSymlink
	mode int64  // permission bits
	link string // a link's target
	host string // a regular file's source on this machine; or
	data []byte // its content
}

// rootfs is the set of paths (absolute, cleaned) a layer holds.
type rootfs map[string]entry

// addDir adds a directory and the directories above it.
func (fs rootfs) addDir(p string, mode int64) {
	if p == "/" {
		return
	}
	for d := p; d != "/"; d = path.Dir(d) {
		if _, ok := fs[d]; !ok {
			fs[d] = entry{typ: tar.TypeDir, mode: 0o755}
		}
	}
	fs[p] = entry{typ: tar.TypeDir, mode: mode}
}

// addFile adds a file with the given content and mode, and its directories.
func (fs rootfs) addFile(p string, data []byte, mode int64) {
	fs.addDir(path.Dir(p), 0o755)
	fs[p] = entry{typ: tar.TypeReg, mode: mode, data: data}
}

// addHost adds a path of this machine as it is there: every symbolic link on the way to it
// (Debian's merged /usr: /lib -> usr/lib, a library's soname -> its file) becomes the same link in
// the layer, followed to the file, so that the ELF loader finds what it finds here.
func (fs rootfs) addHost(p string) error {
	return fs.addHostDepth(p, 0)
}

func (fs rootfs) addHostDepth(p string, depth int) error {
	if depth > 40 {
		return fmt.Errorf("%s: too many levels of symbolic links", p)
	}
	p = filepath.Clean(p)
	if !filepath.IsAbs(p) {
		return fmt.Errorf("%s: not an absolute path", p)
	}
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	cur := "/"
	for i, part := range parts {
		next := path.Join(cur, part)
		fi, err := os.Lstat(next)
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(next)
			if err != nil {
				return err
			}
			fs.addDir(cur, 0o755)
			fs[next] = entry{typ: tar.TypeSymlink, mode: 0o777, link: target}
			resolved := target
			if !filepath.IsAbs(target) {
				resolved = path.Join(cur, target)
			}
			return fs.addHostDepth(path.Join(append([]string{resolved}, parts[i+1:]...)...), depth+1)
		case fi.IsDir():
			if i == len(parts)-1 {
				fs.addDir(next, 0o755)
			}
		case fi.Mode().IsRegular() && i == len(parts)-1:
			mode := int64(0o644)
			if fi.Mode()&0o111 != 0 {
				mode = 0o755
			}
			fs.addDir(cur, 0o755)
			fs[next] = entry{typ: tar.TypeReg, mode: mode, host: next}
		default:
			return fmt.Errorf("%s: neither a directory, a regular file nor a symbolic link", next)
		}
		cur = next
	}
	return nil
}

// tarball writes the layer: entries sorted by path, parents first, every header the same but for
// what the file is (owner root, mode, and the time given: SOURCE_DATE_EPOCH), so that the same
// files make the same bytes.
func (fs rootfs) tarball(mtime time.Time) ([]byte, error) {
	paths := make([]string, 0, len(fs))
	for p := range fs {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		e := fs[p]
		h := &tar.Header{
			Typeflag: e.typ,
			Name:     strings.TrimPrefix(p, "/"),
			Mode:     e.mode,
			ModTime:  mtime,
			Format:   tar.FormatPAX,
		}
		data := e.data
		switch e.typ {
		case tar.TypeDir:
			h.Name += "/"
		case tar.TypeSymlink:
			h.Linkname = e.link
		case tar.TypeReg:
			if e.host != "" {
				b, err := os.ReadFile(e.host)
				if err != nil {
					return nil, err
				}
				data = b
			}
			h.Size = int64(len(data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// multiarch is Debian's library directory name of each architecture the image can be built for.
var multiarch = map[string]struct {
	triplet string
	machine elf.Machine
}{
	"amd64": {"x86_64-linux-gnu", elf.EM_X86_64},
	"arm64": {"aarch64-linux-gnu", elf.EM_AARCH64},
}

// libDirs are the directories the ELF loader searches for a library after a file's run path:
// Debian's multiarch directories (triplet: multiarch's) and the plain ones.
func libDirs(triplet string) []string {
	return []string{"/lib/" + triplet, "/usr/lib/" + triplet, "/lib", "/usr/lib"}
}

// addELFClosure adds ELF files and, transitively, the shared libraries they need (DT_NEEDED,
// searched as the loader does: DT_RUNPATH or DT_RPATH, then Debian's multiarch and plain library
// directories) and their program interpreter. All must be built for machine.
func (fs rootfs) addELFClosure(files []string, arch string) error {
	ma, ok := multiarch[arch]
	if !ok {
		return fmt.Errorf("no Debian multiarch directory known for %s", arch)
	}
	dirs := libDirs(ma.triplet)
	seen := map[string]bool{}
	queue := slices.Clone(files)
	for len(queue) > 0 {
		f := queue[0]
		queue = queue[1:]
		if err := fs.addHost(f); err != nil { // each name: links to one file are links in the layer too
			return err
		}
		real, err := filepath.EvalSymlinks(f)
		if err != nil {
			return err
		}
		if seen[real] {
			continue
		}
		seen[real] = true
		needed, interp, runpath, err := elfDeps(real, ma.machine)
		if err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		if interp != "" {
			queue = append(queue, interp)
		}
		search := append(expandOrigin(runpath, filepath.Dir(real)), dirs...)
		for _, lib := range needed {
			found := ""
			for _, d := range search {
				if _, err := os.Stat(filepath.Join(d, lib)); err == nil {
					found = filepath.Join(d, lib)
					break
				}
			}
			if found == "" {
				return fmt.Errorf("%s needs %s, found in none of %v", f, lib, dirs)
			}
			queue = append(queue, found)
		}
	}
	return nil
}

// elfDeps returns an ELF file's needed libraries, program interpreter and run path, after checking
// that it is built for machine.
func elfDeps(file string, machine elf.Machine) (needed []string, interp string, runpath []string, err error) {
	f, err := elf.Open(file)
	if err != nil {
		return nil, "", nil, err
	}
	defer f.Close()
	if f.Machine != machine {
		return nil, "", nil, fmt.Errorf("built for %s, not %s: the image's iptables files come from this machine, so build the image on a machine of the image's architecture", f.Machine, machine)
	}
	needed, err = f.ImportedLibraries()
	if err != nil {
		return nil, "", nil, err
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			if err != nil {
				return nil, "", nil, err
			}
			interp = string(bytes.TrimRight(b, "\x00"))
		}
	}
	for _, tag := range []elf.DynTag{elf.DT_RUNPATH, elf.DT_RPATH} {
		if vals, err := f.DynString(tag); err == nil {
			for _, v := range vals {
				runpath = append(runpath, filepath.SplitList(v)...)
			}
		}
	}
	return needed, interp, runpath, nil
}

func expandOrigin(dirs []string, origin string) []string {
	r := strings.NewReplacer("$ORIGIN", origin, "${ORIGIN}", origin)
	out := make([]string, 0, len(dirs))
	for _, d := range dirs {
		out = append(out, r.Replace(d))
	}
	return out
}

// debianPackages returns the Debian packages that own the regular files taken from this machine,
// each as "name version" (sorted), and the copyright files they ship. A file dpkg does not know
// is an error: what the image holds must be accountable.
func debianPackages(fs rootfs) (pkgs []string, copyrights []string, err error) {
	owners := map[string]bool{}
	for p, e := range fs {
		if e.host == "" {
			continue
		}
		owner, err := dpkgOwner(p)
		if err != nil {
			return nil, nil, err
		}
		owners[owner] = true
	}
	for o := range owners {
		out, err := exec.Command("dpkg-query", "-W", "-f=${Package} ${Version}", o).Output()
		if err != nil {
			return nil, nil, fmt.Errorf("dpkg-query -W %s: %w", o, err)
		}
		pkgs = append(pkgs, string(out))
		name, _, _ := strings.Cut(o, ":")
		if c := "/usr/share/doc/" + name + "/copyright"; fileExists(c) {
			copyrights = append(copyrights, c)
		}
	}
	slices.Sort(pkgs)
	slices.Sort(copyrights)
	return pkgs, copyrights, nil
}

// dpkgOwner asks dpkg which package ships a file, under each name Debian's merged /usr gives it
// (a package may list /lib/x/libc.so.6 and the file be reached as /usr/lib/x/libc.so.6).
func dpkgOwner(p string) (string, error) {
	candidates := []string{p}
	if rest, ok := strings.CutPrefix(p, "/usr"); ok {
		candidates = append(candidates, rest)
	} else {
		candidates = append(candidates, "/usr"+p)
	}
	var errs []error
	for _, c := range candidates {
		out, err := exec.Command("dpkg-query", "-S", c).Output()
		if err != nil {
			errs = append(errs, fmt.Errorf("dpkg-query -S %s: %w", c, err))
			continue
		}
		line, _, _ := strings.Cut(string(out), "\n")
		if owner, file, ok := strings.Cut(line, ": "); ok && file == c && !strings.Contains(owner, ",") {
			return owner, nil
		}
		errs = append(errs, fmt.Errorf("dpkg-query -S %s: %q", c, line))
	}
	return "", errors.Join(errs...)
}

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}
