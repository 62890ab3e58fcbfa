//! Class names: the 1000 ImageNet-1k names built in, or a label file (one name per line).

use std::path::Path;

const IMAGENET: &str = include_str!("../assets/imagenet_classes.txt");

/// The ImageNet-1k class names in index order.
pub fn imagenet() -> Vec<String> {
    IMAGENET.lines().map(str::to_string).collect()
}

/// Names from a file, one per line (empty lines at the end ignored).
pub fn from_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let names: Vec<String> = text
        .trim_end()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    if names.is_empty() {
        return Err(format!("{}: no class names", path.display()));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    #[test]
    fn imagenet_names_are_the_1000_classes() {
        let names = super::imagenet();
        assert_eq!(names.len(), 1000);
        assert_eq!(names[0], "tench, Tinca tinca");
        assert!(names[281].starts_with("tabby"));
        assert!(names[950].starts_with("orange"));
    }
}
