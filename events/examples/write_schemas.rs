//! Writes every event schema into `schemas/` (run through `just schemas`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let directory = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas"));
    std::fs::create_dir_all(&directory)?;
    for stale in std::fs::read_dir(&directory)? {
        let path = stale?.path();
        if path.extension().is_some_and(|extension| extension == "json") {
            std::fs::remove_file(path)?;
        }
    }
    let files = stone_events::schema::all_schemas();
    for file in &files {
        std::fs::write(directory.join(&file.file_name), stone_events::schema::render(&file.schema))?;
    }
    eprintln!("wrote {} schemas to {}", files.len(), directory.display());
    Ok(())
}
