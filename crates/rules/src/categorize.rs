//! Keyword categories: which of 安全防护 / 操作规范 / 现场管理 / 应急处理 (or a user's own) a rule
//! belongs to.

use aho_corasick::AhoCorasick;
use serde::Deserialize;

use crate::ErrorKind;

const DEFAULT_TOML: &str = include_str!("categories.toml");

/// One category and the keywords that put a rule in it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Category {
    pub name: String,
    pub keywords: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryFile {
    #[serde(default)]
    replace_defaults: bool,
    #[serde(default)]
    category: Vec<Category>,
}

/// Assigns categories to rule text by counting keyword occurrences.
#[derive(Debug, Clone)]
pub struct Categorizer {
    categories: Vec<Category>,
    /// All keywords of all categories in one automaton, so a text is scanned once.
    matcher: AhoCorasick,
    /// The category index of each pattern in `matcher`.
    pattern_category: Vec<usize>,
}

impl Default for Categorizer {
    fn default() -> Self {
        let file: CategoryFile =
            toml::from_str(DEFAULT_TOML).expect("the bundled categories.toml is valid");
        Categorizer::new(file.category).expect("the bundled keywords build")
    }
}

impl Categorizer {
    /// The defaults, overridden by a TOML file's contents (see `categories.toml`).
    pub fn with_overrides(toml_text: &str) -> Result<Self, ErrorKind> {
        let file: CategoryFile =
            toml::from_str(toml_text).map_err(|e| ErrorKind::Config(e.to_string()))?;
        let mut categories = if file.replace_defaults {
            Vec::new()
        } else {
            Categorizer::default().categories
        };
        for category in file.category {
            if category.name.trim().is_empty() {
                return Err(ErrorKind::Config("a category has an empty name".into()));
            }
            match categories.iter_mut().find(|c| c.name == category.name) {
                Some(existing) => existing.keywords = category.keywords,
                None => categories.push(category),
            }
        }
        Categorizer::new(categories)
    }

    fn new(categories: Vec<Category>) -> Result<Self, ErrorKind> {
        let mut patterns = Vec::new();
        let mut pattern_category = Vec::new();
        for (i, c) in categories.iter().enumerate() {
            for k in c.keywords.iter().filter(|k| !k.is_empty()) {
                patterns.push(k.as_str());
                pattern_category.push(i);
            }
        }
        let matcher = AhoCorasick::new(&patterns).map_err(|e| ErrorKind::Config(e.to_string()))?;
        Ok(Categorizer {
            categories,
            matcher,
            pattern_category,
        })
    }

    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// Categories for `text`, most keyword hits first (ties in configuration order); empty
    /// when no keyword occurs.
    pub fn categorize(&self, text: &str) -> Vec<String> {
        let mut hits = vec![0usize; self.categories.len()];
        for m in self.matcher.find_overlapping_iter(text) {
            hits[self.pattern_category[m.pattern().as_usize()]] += 1;
        }
        let mut scored: Vec<(usize, usize, &str)> = hits
            .iter()
            .enumerate()
            .filter(|(_, h)| **h > 0)
            .map(|(order, &h)| (h, order, self.categories[order].name.as_str()))
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .map(|(_, _, name)| name.to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_hits_first() {
        let c = Categorizer::default();
        assert_eq!(
            c.categorize("进入作业区域必须佩戴安全帽"),
            vec!["安全防护".to_string(), "现场管理".to_string()]
        );
        assert!(c.categorize("本规程自发布之日起施行").is_empty());
    }

    #[test]
    fn overrides_add_and_replace() {
        let c = Categorizer::with_overrides(
            "[[category]]\nname = \"电气安全\"\nkeywords = [\"配电\", \"带电\"]\n\
             [[category]]\nname = \"应急处理\"\nkeywords = [\"报警\"]\n",
        )
        .unwrap();
        assert_eq!(c.categorize("配电柜带电")[0], "电气安全");
        assert_eq!(
            c.categorize("发生火灾立即报警"),
            vec!["应急处理".to_string()]
        );
        let only = Categorizer::with_overrides(
            "replace_defaults = true\n[[category]]\nname = \"电气安全\"\nkeywords = [\"配电\"]\n",
        )
        .unwrap();
        assert_eq!(only.categories().len(), 1);
        assert!(Categorizer::with_overrides("[[category]]\nname = 3").is_err());
    }
}
