//! Only 2-D, little-endian, C-order matrices of float32 (`'<f4'`) or uint32
//! (`'<u4'`): the embedding and index files the curation CLI and the FAISS
//! comparison exchange with NumPy.
//!
//! Reads NumPy format versions 1.0, 2.0 and 3.0 (the header length field is
//! 2 bytes in 1.0, 4 bytes after); writes 1.0 exactly as `numpy.save` does
//! (header padded with spaces to a multiple of 64 bytes, ending in `\n`).
//! Every problem with a file (not .npy, wrong dtype, Fortran order, not 2-D,
//! truncated, I/O) is an [`Error::File`] naming the file; nothing panics on
//! bad input. Writes follow [`crate::output`]'s rules (a temporary file
//! renamed into place, devices and FIFOs written through, never an input).
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("platypus-npy-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let path = dir.join("emb.npy");
//! platypus::npy::write_f32_matrix(&path, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3])?;
//! let (data, shape) = platypus::npy::read_f32_matrix(&path)?;
//! assert_eq!((data[5], shape), (6.0, [2, 3]));
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::output::{Group, Outputs};
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Reads a 2-D little-endian float32 C-order `.npy` file: (values row-major,
/// [rows, cols]).
pub fn read_f32_matrix(path: &Path) -> Result<(Vec<f32>, [usize; 2])> {
    read_matrix::<f32>(path)
}

/// Reads a 2-D little-endian uint32 C-order `.npy` file: (values row-major,
/// [rows, cols]).
pub fn read_u32_matrix(path: &Path) -> Result<(Vec<u32>, [usize; 2])> {
    read_matrix::<u32>(path)
}

/// Writes `data` ([rows, cols], row-major) as a `'<f4'` `.npy` file, by the
/// rules of [`crate::output`] (never half-written).
pub fn write_f32_matrix(path: &Path, data: &[f32], shape: [usize; 2]) -> Result<()> {
    let outputs = Outputs::default();
    let mut group = outputs.group();
    add_matrix(&mut group, path, data, shape, "npy::write_f32_matrix")?;
    group.commit()
}

/// Writes `data` ([rows, cols], row-major) as a `'<u4'` `.npy` file (top-k
/// indices), by the rules of [`crate::output`].
pub fn write_u32_matrix(path: &Path, data: &[u32], shape: [usize; 2]) -> Result<()> {
    let outputs = Outputs::default();
    let mut group = outputs.group();
    add_matrix(&mut group, path, data, shape, "npy::write_u32_matrix")?;
    group.commit()
}

/// Adds a `'<f4'` `.npy` file to `group` (written when the group commits).
pub fn add_f32_matrix(
    group: &mut Group<'_>,
    path: &Path,
    data: &[f32],
    shape: [usize; 2],
) -> Result<()> {
    add_matrix(group, path, data, shape, "npy::add_f32_matrix")
}

/// Adds a `'<u4'` `.npy` file to `group` (written when the group commits).
pub fn add_u32_matrix(
    group: &mut Group<'_>,
    path: &Path,
    data: &[u32],
    shape: [usize; 2],
) -> Result<()> {
    add_matrix(group, path, data, shape, "npy::add_u32_matrix")
}

/// An element type with a fixed little-endian `.npy` descr.
trait Element: bytemuck::Pod {
    /// The dtype string NumPy writes.
    const DESCR: &'static str;
    /// What the descr means, for error messages.
    const NAME: &'static str;
    /// Converts in place between little-endian storage and native order.
    fn swap_le(values: &mut [Self]);
}

impl Element for f32 {
    const DESCR: &'static str = "<f4";
    const NAME: &'static str = "little-endian float32";
    fn swap_le(values: &mut [f32]) {
        if cfg!(target_endian = "big") {
            for v in values {
                *v = f32::from_bits(v.to_bits().swap_bytes());
            }
        }
    }
}

impl Element for u32 {
    const DESCR: &'static str = "<u4";
    const NAME: &'static str = "little-endian uint32";
    fn swap_le(values: &mut [u32]) {
        if cfg!(target_endian = "big") {
            for v in values {
                *v = v.swap_bytes();
            }
        }
    }
}

fn file_error(path: &Path, what: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn read_matrix<T: Element>(path: &Path) -> Result<(Vec<T>, [usize; 2])> {
    let io = |e: std::io::Error| file_error(path, format!("cannot read: {e}"));
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();

    // Magic, version, header length.
    let mut preamble = [0u8; 8];
    let got = read_up_to(&mut file, &mut preamble).map_err(io)?;
    if got < 8 || &preamble[..6] != MAGIC {
        return Err(file_error(
            path,
            format!(
                "not a .npy file: starts with {:?}, expected the magic string \"\\x93NUMPY\" and a version",
                String::from_utf8_lossy(&preamble[..got.min(8)])
            ),
        ));
    }
    let (major, minor) = (preamble[6], preamble[7]);
    let (header_len, len_bytes) = match major {
        1 => {
            let mut b = [0u8; 2];
            read_exact_or_truncated(&mut file, &mut b, path, "header length")?;
            (u16::from_le_bytes(b) as u64, 2)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            read_exact_or_truncated(&mut file, &mut b, path, "header length")?;
            (u32::from_le_bytes(b) as u64, 4)
        }
        _ => {
            return Err(file_error(
                path,
                format!(
                    "unsupported .npy format version {major}.{minor}, expected 1.0, 2.0 or 3.0"
                ),
            ))
        }
    };
    let data_offset = 8 + len_bytes + header_len;
    if file_len < data_offset {
        return Err(file_error(
            path,
            format!(
                "truncated: the header says it is {header_len} bytes long but the file has {file_len} bytes in all"
            ),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    read_exact_or_truncated(&mut file, &mut header, path, "header")?;
    let header = std::str::from_utf8(&header)
        .map_err(|_| file_error(path, "the .npy header is not UTF-8 text"))?;
    let header = Header::parse(header).map_err(|e| {
        file_error(
            path,
            format!("cannot parse the .npy header {header:?}: {e}"),
        )
    })?;

    if header.descr != T::DESCR {
        return Err(file_error(
            path,
            format!(
                "dtype is '{}', expected '{}' ({})",
                header.descr,
                T::DESCR,
                T::NAME
            ),
        ));
    }
    if header.fortran_order {
        return Err(file_error(
            path,
            "fortran_order is True (column-major), expected C order (fortran_order False); \
             save numpy.ascontiguousarray(a) instead",
        ));
    }
    let shape: [usize; 2] = header.shape.as_slice().try_into().map_err(|_| {
        file_error(
            path,
            format!(
                "shape is {}, {}-D, expected a 2-D matrix",
                tuple(&header.shape),
                header.shape.len()
            ),
        )
    })?;
    let data_len = file_len - data_offset;
    let expected = shape[0]
        .checked_mul(shape[1])
        .and_then(|c| c.checked_mul(size_of::<T>()))
        .map(|b| b as u64);
    if expected != Some(data_len) {
        let what = if expected.is_none_or(|e| e > data_len) {
            "truncated"
        } else {
            "wrong size"
        };
        let expected = expected.map_or("more than fits in memory".to_string(), |e| {
            format!("{e} bytes")
        });
        return Err(file_error(
            path,
            format!(
                "{what}: data is {data_len} bytes, expected {expected} for shape {} of '{}'",
                tuple(&header.shape),
                T::DESCR
            ),
        ));
    }
    let count = shape[0] * shape[1];
    let mut values = vec![T::zeroed(); count];
    read_exact_or_truncated(
        &mut file,
        bytemuck::cast_slice_mut(&mut values),
        path,
        "data",
    )?;
    T::swap_le(&mut values);
    Ok((values, shape))
}

/// Reads as much of `buf` as the file has; returns how many bytes were read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn read_exact_or_truncated(file: &mut File, buf: &mut [u8], path: &Path, part: &str) -> Result<()> {
    let got = read_up_to(file, buf).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    if got < buf.len() {
        return Err(file_error(
            path,
            format!(
                "truncated: the {part} needs {} bytes, the file has {got} left",
                buf.len()
            ),
        ));
    }
    Ok(())
}

/// Formats a shape as Python does: `(2, 3)`, `(6,)`, `()`.
fn tuple(shape: &[usize]) -> String {
    match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The three keys of a `.npy` header.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl Header {
    /// Parses the Python dict literal NumPy writes, e.g.
    /// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`
    /// followed by padding spaces and `\n`.
    fn parse(text: &str) -> std::result::Result<Header, String> {
        let mut p = Parser {
            s: text.trim_end().as_bytes(),
            at: 0,
        };
        p.expect(b'{')?;
        let (mut descr, mut fortran_order, mut shape) = (None, None, None);
        loop {
            p.skip_ws();
            if p.eat(b'}') {
                break;
            }
            let key = p.string()?;
            p.skip_ws();
            p.expect(b':')?;
            p.skip_ws();
            match key.as_str() {
                "descr" => descr = Some(p.string().map_err(|e| format!("descr: {e}"))?),
                "fortran_order" => fortran_order = Some(p.boolean()?),
                "shape" => shape = Some(p.shape()?),
                other => return Err(format!("unexpected key '{other}'")),
            }
            p.skip_ws();
            if !p.eat(b',') {
                p.skip_ws();
                p.expect(b'}')?;
                break;
            }
        }
        if p.at != p.s.len() {
            return Err("text after the closing '}'".into());
        }
        Ok(Header {
            descr: descr.ok_or("no 'descr' key")?,
            fortran_order: fortran_order.ok_or("no 'fortran_order' key")?,
            shape: shape.ok_or("no 'shape' key")?,
        })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.at))
        }
    }

    /// A quoted string without escapes ('...' or "...").
    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted string at byte {}", self.at)),
        };
        self.at += 1;
        let start = self.at;
        while self.peek().is_some_and(|c| c != quote && c != b'\\') {
            self.at += 1;
        }
        if !self.eat(quote) {
            return Err(format!("unterminated or escaped string at byte {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at - 1]).into_owned())
    }

    fn boolean(&mut self) -> std::result::Result<bool, String> {
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.at..].starts_with(word) {
                self.at += word.len();
                return Ok(value);
            }
        }
        Err(format!("expected True or False at byte {}", self.at))
    }

    /// A tuple of non-negative integers: `()`, `(6,)`, `(2, 3)`.
    fn shape(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.at;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.at += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.at]).unwrap_or("");
            let dim = digits
                .parse::<usize>()
                .map_err(|_| format!("expected a dimension at byte {start}"))?;
            dims.push(dim);
            // Python 2 wrote long integers as 3L.
            self.eat(b'L');
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

fn add_matrix<T: Element>(
    group: &mut Group<'_>,
    path: &Path,
    data: &[T],
    shape: [usize; 2],
    op: &'static str,
) -> Result<()> {
    if shape[0].checked_mul(shape[1]) != Some(data.len()) {
        return Err(Error::Invalid {
            op,
            arg: "data",
            what: format!(
                "has {} elements, expected {} x {} for shape {:?}",
                data.len(),
                shape[0],
                shape[1],
                shape
            ),
        });
    }
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({}, {}), }}",
        T::DESCR,
        shape[0],
        shape[1]
    );
    // Magic (6) + version (2) + length (2) + header, a multiple of 64 with the '\n'.
    let unpadded = 10 + header.len() + 1;
    header.extend(std::iter::repeat_n(
        ' ',
        unpadded.next_multiple_of(64) - unpadded,
    ));
    header.push('\n');
    group.file(path, |out| {
        out.write_all(MAGIC)?;
        out.write_all(&[1, 0])?;
        out.write_all(&(header.len() as u16).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        if cfg!(target_endian = "little") {
            out.write_all(bytemuck::cast_slice(data))
        } else {
            for chunk in data.chunks(1 << 16) {
                let mut le = chunk.to_vec();
                T::swap_le(&mut le);
                out.write_all(bytemuck::cast_slice(&le))?;
            }
            Ok(())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("platypus-npy-{}-{name}", std::process::id()));
            std::fs::remove_dir_all(&dir).ok();
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, file: &str) -> PathBuf {
            self.0.join(file)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    /// The bytes `numpy.save` writes for a version 1.0 file with this header dict.
    fn npy_bytes(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dict.to_string();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    const DICT_2X3: &str = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

    fn expect_file_error(path: &Path, needle: &str) {
        match read_f32_matrix(path) {
            Err(Error::File { path: p, what }) => {
                assert_eq!(p, path);
                assert!(
                    what.contains(needle),
                    "{what:?} does not mention {needle:?}"
                );
                // The message names the file.
                let msg = Error::File { path: p, what }.to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
            other => panic!(
                "{}: expected Error::File mentioning {needle:?}, got {other:?}",
                path.display()
            ),
        }
    }

    #[test]
    fn round_trip_f32_and_u32() {
        let dir = TempDir::new("round-trip");
        for shape in [[2, 3], [1, 1], [0, 5], [7, 0], [33, 17]] {
            let data: Vec<f32> = (0..shape[0] * shape[1])
                .map(|i| i as f32 * 0.37 - 3.0)
                .collect();
            let path = dir.path("m.npy");
            write_f32_matrix(&path, &data, shape).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let header_end = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!(header_end % 64, 0);
            assert_eq!(bytes[header_end - 1], b'\n');
            assert_eq!(read_f32_matrix(&path).unwrap(), (data, shape));
        }
        let special = [f32::NAN, f32::INFINITY, -0.0, f32::MIN_POSITIVE / 2.0];
        let path = dir.path("special.npy");
        write_f32_matrix(&path, &special, [2, 2]).unwrap();
        let (got, _) = read_f32_matrix(&path).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&special));

        let idx = [0, 7, u32::MAX, 42, 1, 2];
        let path = dir.path("idx.npy");
        write_u32_matrix(&path, &idx, [3, 2]).unwrap();
        assert_eq!(read_u32_matrix(&path).unwrap(), (idx.to_vec(), [3, 2]));
        // The dtypes are told apart.
        expect_file_error(&path, "dtype is '<u4', expected '<f4'");
        // Overwriting replaces, and no temporary file is left behind.
        write_u32_matrix(&path, &[5], [1, 1]).unwrap();
        assert_eq!(read_u32_matrix(&path).unwrap(), (vec![5], [1, 1]));
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    }

    #[test]
    fn writes_exactly_what_numpy_writes() {
        let dir = TempDir::new("exact");
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let path = dir.path("a.npy");
        write_f32_matrix(&path, &data, [2, 3]).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            npy_bytes(DICT_2X3, &f32_bytes(&data))
        );
    }

    #[test]
    fn reads_handmade_numpy_headers_v1_and_v2() {
        let dir = TempDir::new("handmade");
        let data = [0.5, -1.0, 2.25, 3.0, -0.0, 1e-3];
        let v1 = npy_bytes(DICT_2X3, &f32_bytes(&data));
        let path = dir.path("v1.npy");
        std::fs::write(&path, &v1).unwrap();
        assert_eq!(read_f32_matrix(&path).unwrap(), (data.to_vec(), [2, 3]));

        // Version 2.0: a 4-byte header length, padding to 64 as NumPy does.
        let mut header = DICT_2X3.to_string();
        while (12 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
        v2.extend((header.len() as u32).to_le_bytes());
        v2.extend(header.as_bytes());
        v2.extend(f32_bytes(&data));
        let path = dir.path("v2.npy");
        std::fs::write(&path, &v2).unwrap();
        assert_eq!(read_f32_matrix(&path).unwrap(), (data.to_vec(), [2, 3]));

        // Keys in another order, double quotes, no trailing comma, Python 2 longs.
        let dict = "{\"shape\": (2L, 3L), \"fortran_order\": False, \"descr\": \"<f4\"}";
        let path = dir.path("odd.npy");
        std::fs::write(&path, npy_bytes(dict, &f32_bytes(&data))).unwrap();
        assert_eq!(read_f32_matrix(&path).unwrap(), (data.to_vec(), [2, 3]));
    }

    #[test]
    fn bad_files_are_typed_errors() {
        let dir = TempDir::new("bad");
        let data = f32_bytes(&[1.0; 6]);
        let case = |name: &str, bytes: &[u8], needle: &str| {
            let path = dir.path(name);
            std::fs::write(&path, bytes).unwrap();
            expect_file_error(&path, needle);
        };
        let dict = |descr: &str, fortran: &str, shape: &str| {
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}")
        };
        case("text.npy", b"hello, world\n", "not a .npy file");
        case("empty.npy", b"", "not a .npy file");
        case("short.npy", b"\x93NUM", "not a .npy file");
        case(
            "v9.npy",
            b"\x93NUMPY\x09\x00\x10\x00",
            "unsupported .npy format version 9.0",
        );
        case("nolen.npy", b"\x93NUMPY\x01\x00\x10", "truncated");
        case(
            "f8.npy",
            &npy_bytes(&dict("<f8", "False", "(2, 3)"), &[0; 48]),
            "dtype is '<f8', expected '<f4'",
        );
        case(
            "big.npy",
            &npy_bytes(&dict(">f4", "False", "(2, 3)"), &data),
            "dtype is '>f4', expected '<f4'",
        );
        case(
            "fortran.npy",
            &npy_bytes(&dict("<f4", "True", "(2, 3)"), &data),
            "fortran_order is True",
        );
        case(
            "1d.npy",
            &npy_bytes(&dict("<f4", "False", "(6,)"), &data),
            "shape is (6,), 1-D, expected a 2-D matrix",
        );
        case(
            "3d.npy",
            &npy_bytes(&dict("<f4", "False", "(1, 2, 3)"), &data),
            "shape is (1, 2, 3), 3-D",
        );
        case(
            "0d.npy",
            &npy_bytes(&dict("<f4", "False", "()"), &data[..4]),
            "shape is (), 0-D",
        );
        case(
            "truncated.npy",
            &npy_bytes(DICT_2X3, &data[..20]),
            "truncated: data is 20 bytes, expected 24 bytes for shape (2, 3)",
        );
        case(
            "long.npy",
            &npy_bytes(DICT_2X3, &[data.clone(), vec![0; 4]].concat()),
            "wrong size: data is 28 bytes, expected 24 bytes",
        );
        case(
            "huge.npy",
            &npy_bytes(&dict("<f4", "False", "(18446744073709551615, 2)"), &data),
            "truncated",
        );
        let full = npy_bytes(DICT_2X3, &data);
        case("cut-header.npy", &full[..40], "truncated: the header says");
        case(
            "garbage.npy",
            &npy_bytes("{'descr': '<f4', 'shape': [2, 3]}", &data),
            "cannot parse",
        );
        case(
            "nokey.npy",
            &npy_bytes("{'descr': '<f4', 'shape': (2, 3)}", &data),
            "no 'fortran_order' key",
        );
        case(
            "struct.npy",
            &npy_bytes(
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3)}",
                &data,
            ),
            "descr",
        );
        let mut not_utf8 = full.clone();
        not_utf8[12] = 0xff;
        case("utf8.npy", &not_utf8, "not UTF-8");
        expect_file_error(&dir.path("missing.npy"), "cannot read");
        // Writing: a missing directory is an output error, a shape mismatch an argument error.
        let nowhere = dir.path("no/such/dir.npy");
        assert!(matches!(
            write_f32_matrix(&nowhere, &[1.0], [1, 1]),
            Err(Error::Output { path, .. }) if path == nowhere
        ));
        assert!(matches!(
            write_f32_matrix(&dir.path("x.npy"), &[1.0; 5], [2, 3]),
            Err(Error::Invalid { arg: "data", .. })
        ));
    }

    /// With python3 and NumPy on the machine: files written by `numpy.save`
    /// read back, and ours load in NumPy. Without them, the hand-made headers
    /// above (byte for byte what NumPy writes) stand in.
    #[test]
    fn interoperates_with_real_numpy_when_available() {
        let has_numpy = Command::new("python3")
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_numpy {
            eprintln!("python3 with numpy not found: skipping the NumPy round trip");
            return;
        }
        let dir = TempDir::new("numpy");
        let script = "
import sys, numpy as np
d = sys.argv[1]
a = (np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5 - 1).astype(np.float32)
np.save(d + '/np.npy', a)
np.save(d + '/np_idx.npy', np.array([[1, 2], [3, 4294967295]], dtype=np.uint32))
np.save(d + '/np_fortran.npy', np.asfortranarray(a))
np.save(d + '/np_f64.npy', a.astype(np.float64))
np.lib.format.write_array(open(d + '/np_v2.npy', 'wb'), a, version=(2, 0))
";
        let dir_str = dir.0.to_str().unwrap();
        let out = Command::new("python3")
            .args(["-c", script, dir_str])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        assert_eq!(
            read_f32_matrix(&dir.path("np.npy")).unwrap(),
            (want.clone(), [3, 4])
        );
        assert_eq!(
            read_f32_matrix(&dir.path("np_v2.npy")).unwrap(),
            (want.clone(), [3, 4])
        );
        assert_eq!(
            read_u32_matrix(&dir.path("np_idx.npy")).unwrap(),
            (vec![1, 2, 3, u32::MAX], [2, 2])
        );
        expect_file_error(&dir.path("np_fortran.npy"), "fortran_order is True");
        expect_file_error(&dir.path("np_f64.npy"), "dtype is '<f8'");
        // Ours is byte-identical to NumPy's, and NumPy reads it.
        write_f32_matrix(&dir.path("ours.npy"), &want, [3, 4]).unwrap();
        assert_eq!(
            std::fs::read(dir.path("ours.npy")).unwrap(),
            std::fs::read(dir.path("np.npy")).unwrap()
        );
        write_u32_matrix(&dir.path("ours_idx.npy"), &[1, 2, 3, u32::MAX], [2, 2]).unwrap();
        let check = "
import sys, numpy as np
d = sys.argv[1]
i = np.load(d + '/ours_idx.npy')
assert i.dtype == np.uint32 and i.shape == (2, 2) and i[1, 1] == 4294967295, i
";
        let out = Command::new("python3")
            .args(["-c", check, dir_str])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
