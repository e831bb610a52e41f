//! The completeness check for ELF files, so that a library `cp` is still
//! writing is never copied or loaded.

/// Whether an ELF file's headers, segments and section table all fit in
/// `bytes`. `cp` writes from the start, so a file it is still writing ends
/// before its section header table (which linkers put last). Files that
/// are not ELF are left to the dynamic loader to refuse.
#[cfg(test)]
pub fn check_complete(bytes: &[u8]) -> Result<(), String> {
    check_complete_at(bytes.len() as u64, |at, out| {
        let at = usize::try_from(at).ok()?;
        out.copy_from_slice(bytes.get(at..at.checked_add(out.len())?)?);
        Some(())
    })
}

/// Whether the ELF file `file`, of `len` bytes, is complete (see
/// `check_complete`), reading only the header fields it needs.
pub fn check_file_complete(file: &std::fs::File, len: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    check_complete_at(len, |at, out| file.read_exact_at(out, at).ok())
}

/// Only the few header fields this needs are read (the layout is fixed by
/// the ELF specification), through `read_at`, rather than parsing the whole
/// file; `read_at` fills its buffer from an offset, or fails past the end.
fn check_complete_at(
    len: u64,
    read_at: impl Fn(u64, &mut [u8]) -> Option<()>,
) -> Result<(), String> {
    if len == 0 {
        return Err("the file is empty".into());
    }
    let mut ident = [0u8; 6];
    let head = usize::try_from(len.min(6)).unwrap_or(6);
    read_at(0, &mut ident[..head]).ok_or("the file cannot be read")?;
    let ident = &ident[..head];
    if ident.len() < 4 && b"\x7fELF".starts_with(ident) {
        return Err("the ELF header is cut short".into());
    }
    if !ident.starts_with(b"\x7fELF") {
        return Ok(());
    }
    let class64 = match ident.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err("the ELF header is cut short".into()),
    };
    let little = match ident.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err("the ELF header is cut short".into()),
    };
    let read = |at: u64, width: usize| -> Option<u64> {
        let mut field = [0u8; 8];
        let field = &mut field[..width];
        read_at(at, field)?;
        let mut value = 0u64;
        for i in 0..width {
            let byte = if little {
                field[width - 1 - i]
            } else {
                field[i]
            };
            value = (value << 8) | u64::from(byte);
        }
        Some(value)
    };
    let short = || "the ELF header is cut short".to_owned();
    // (e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum) offsets.
    let (phoff, shoff, sizes, word) = if class64 {
        (0x20, 0x28, 0x36, 8)
    } else {
        (0x1c, 0x20, 0x2a, 4)
    };
    let phoff = read(phoff, word).ok_or_else(short)?;
    let shoff = read(shoff, word).ok_or_else(short)?;
    let phentsize = read(sizes, 2).ok_or_else(short)?;
    let phnum = read(sizes + 2, 2).ok_or_else(short)?;
    let shentsize = read(sizes + 4, 2).ok_or_else(short)?;
    let shnum = read(sizes + 6, 2).ok_or_else(short)?;
    let end = |offset: u64, size: u64| offset.checked_add(size).filter(|&e| e <= len);
    end(phoff, phentsize * phnum).ok_or("its program headers lie past its end")?;
    end(shoff, shentsize * shnum).ok_or("its section header table lies past its end")?;
    for i in 0..phnum {
        let entry = phoff + i * phentsize;
        let (p_offset, p_filesz) = if class64 {
            (read(entry + 8, 8), read(entry + 32, 8))
        } else {
            (read(entry + 4, 4), read(entry + 16, 4))
        };
        let (Some(offset), Some(filesz)) = (p_offset, p_filesz) else {
            return Err(short());
        };
        end(offset, filesz).ok_or("a segment lies past its end")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn a_library_cut_anywhere_is_incomplete() {
        // This test binary is an ELF file with program and section headers.
        let whole = fs::read(std::env::current_exe().expect("test binary")).expect("reading");
        assert_eq!(check_complete(&whole), Ok(()));
        for cut in [0, 3, 40, 64, 4096, whole.len() / 2, whole.len() - 1] {
            assert!(
                check_complete(&whole[..cut]).is_err(),
                "cut at {cut} of {} passed",
                whole.len()
            );
        }
    }
}
