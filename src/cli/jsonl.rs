//! JSONL plumbing shared by the offline commands: resumable output files, sharding,
//! Ctrl-C, and progress on stderr.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, IsTerminal, Seek, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a malformed input line does: `skip` writes an error line and goes on, `fail` stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    Skip,
    Fail,
}

/// `--shard I/N`: this run handles the input lines with `index % N == I` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(s: &str) -> std::result::Result<Shard, String> {
        let bad = || format!("`{s}` is not a shard: expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    pub fn takes(&self, line_index: usize) -> bool {
        line_index % self.count == self.index
    }
}

/// One input line of a group: its id (the `"id"` field, else the 1-based line number) and
/// its JSON, or why it is not JSON.
pub struct InputLine {
    pub id: Value,
    pub json: std::result::Result<Value, String>,
}

/// Reads the next `size` input lines and keeps those this run handles: in its `shard`, and
/// not already written (`done`, from `--resume`). Returns them and how many were skipped as
/// already written.
pub fn read_group(
    lines: &mut impl Iterator<Item = (usize, std::io::Result<String>)>,
    size: usize,
    shard: Option<Shard>,
    done: &HashSet<String>,
    bar: &indicatif::ProgressBar,
) -> Result<(Vec<InputLine>, usize)> {
    let (mut group, mut skipped) = (Vec::new(), 0);
    for (i, line) in lines.take(size.max(1)) {
        let line = line?;
        if shard.is_some_and(|s| !s.takes(i)) {
            continue;
        }
        bar.inc(1);
        let json = serde_json::from_str::<Value>(&line).map_err(|e| format!("not valid JSON: {e}"));
        let id = json
            .as_ref()
            .ok()
            .and_then(|v| v.get("id").cloned())
            .unwrap_or(Value::from(i + 1));
        if done.contains(&id_key(&id)) {
            skipped += 1;
            continue;
        }
        group.push(InputLine { id, json });
    }
    Ok((group, skipped))
}

/// The key an id is compared by when resuming (its JSON text).
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

/// Opens the output: stdout for `-`; a file, truncated, or with `resume` kept up to its
/// last complete line, whose ids are returned so those input lines can be skipped.
pub fn open_output(path: &str, resume: bool) -> Result<(Box<dyn Write>, HashSet<String>)> {
    if path == "-" {
        if resume {
            bail!("--resume needs --output FILE (it reads back what was written)");
        }
        return Ok((
            Box::new(std::io::BufWriter::new(std::io::stdout())),
            HashSet::new(),
        ));
    }
    let mut done = HashSet::new();
    let exists = std::path::Path::new(path).exists();
    if !(resume && exists) {
        let f = std::fs::File::create(path).with_context(|| format!("creating {path}"))?;
        return Ok((Box::new(std::io::BufWriter::new(f)), done));
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {path} to resume"))?;
    // Keep whole lines that parse and carry an id; a line cut by a kill is dropped.
    let mut keep = 0u64;
    let mut reader = std::io::BufReader::new(&mut f);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        match serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("id").cloned())
        {
            Some(id) => {
                done.insert(id_key(&id));
                keep += n as u64;
            }
            None => break,
        }
    }
    drop(reader);
    f.set_len(keep)?;
    f.seek(std::io::SeekFrom::End(0))?;
    Ok((Box::new(std::io::BufWriter::new(f)), done))
}

/// A flag raised by Ctrl-C: runs stop between steps and write only whole lines.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // Only one handler per process; a second registration (tests) keeps the first.
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
    flag
}

/// A progress bar with rate and ETA on stderr; hidden when stderr is not a terminal or
/// with `--quiet`.
pub fn progress(total: Option<u64>, quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{bar:30}} {{pos}}/{{len}} {what} {{per_sec}} ETA {{eta}} {{msg}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Counts the lines of an input file for the progress bar (None for stdin).
pub fn count_lines(path: &str) -> Option<u64> {
    if path == "-" {
        return None;
    }
    let f = std::fs::File::open(path).ok()?;
    Some(std::io::BufReader::new(f).lines().count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_partition() {
        let s = Shard::parse("1/3").unwrap();
        assert_eq!(
            (0..9).filter(|&i| s.takes(i)).collect::<Vec<_>>(),
            vec![1, 4, 7]
        );
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("1").is_err());
        assert!(Shard::parse("0/0").is_err());
    }
}
