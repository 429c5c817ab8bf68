//! Sizes as users type them: token counts (`8k`, `1m`: powers of two) and byte budgets
//! (`512MiB`, `2GiB`, `2G`, or a plain number).

use anyhow::{bail, Result};

fn split(s: &str) -> (&str, &str) {
    let i = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..i], s[i..].trim())
}

/// `4096`, `8k`, `1m` (k = 1024, m = 1024^2).
pub fn tokens(s: &str) -> Result<usize> {
    let (n, unit) = split(s.trim());
    let n: f64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a token count (like 4096, 8k or 1m)"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1048576.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (use k or m)"),
    };
    Ok((n * mult) as usize)
}

/// A `--lengths` list: every entry a token count of at least `min`.
pub fn token_list(items: &[String], min: usize) -> Result<Vec<usize>> {
    let v: Vec<usize> = items.iter().map(|s| tokens(s)).collect::<Result<_>>()?;
    if let Some(bad) = v.iter().find(|l| **l < min) {
        bail!("--lengths: {bad} is below the minimum of {min} tokens");
    }
    Ok(v)
}

/// `512MiB`, `2GiB`, `2G`, `1.5GB`, `4096B`, or `0`. A plain number other than 0 is refused:
/// `--gpu-mem 80` once meant 80 bytes.
pub fn bytes(s: &str) -> Result<u64> {
    let (n, unit) = split(s.trim());
    let n: f64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a size (like 512MiB or 2GiB)"))?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" if n == 0.0 => 1.0,
        "" => bail!("{s:?} needs a unit: say {n}GB, {n}GiB or {n}MiB (or {n}B for bytes)"),
        "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1048576.0,
        "mb" => 1e6,
        "g" | "gib" => 1073741824.0,
        "gb" => 1e9,
        "t" | "tib" => 1099511627776.0,
        "tb" => 1e12,
        _ => bail!("{s:?}: unknown unit {unit:?}"),
    };
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn units() {
        assert_eq!(super::tokens("8k").unwrap(), 8192);
        assert_eq!(super::tokens("1m").unwrap(), 1 << 20);
        assert_eq!(super::tokens("300").unwrap(), 300);
        assert!(super::tokens("1x").is_err());
        assert_eq!(super::bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(super::bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(super::bytes("80GB").unwrap(), 80_000_000_000);
        assert!(super::bytes("lots").is_err());
        assert_eq!(super::bytes("0").unwrap(), 0);
        assert_eq!(super::bytes("4096B").unwrap(), 4096);
        let e = super::bytes("80").unwrap_err().to_string();
        assert!(e.contains("needs a unit") && e.contains("80GB"), "{e}");
    }
}
