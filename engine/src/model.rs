//! A model file opened for use: the GGUF, its configuration and its tokenizer, plus the prompt
//! rendering the goldens use (chat template with add_generation_prompt, then tokenize with
//! add_special and parse_special on).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::chat::{self, ChatMessage};
use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// What a prompt is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text, tokenized as is.
    Text(String),
    /// Chat messages, rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
}

pub struct Model {
    pub path: PathBuf,
    pub file: GgufFile,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// An injected bug class of the prompt path (crate::faults: special tokens split, chat template
    /// skipped); `None` unless a caller sets it.
    pub fault: Option<crate::faults::Fault>,
}

impl Model {
    /// `spec`: a known model id (fetched into the cache when missing) or a GGUF path.
    pub fn open(spec: &str) -> Result<Model> {
        let path = crate::fetch::resolve_model(spec, true)?;
        Self::open_path(path)
    }

    pub fn open_path(path: PathBuf) -> Result<Model> {
        let file = GgufFile::open(&path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file).with_context(|| format!("{}: tokenizer", path.display()))?;
        Ok(Model { path, file, config, tokenizer, fault: None })
    }

    /// The text the model sees: `Text` as is; `Chat` rendered with the GGUF's template
    /// (add_generation_prompt on, bos/eos texts of the file's bos/eos ids).
    pub fn render(&self, prompt: &Prompt) -> Result<String> {
        match prompt {
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Chat(msgs) => {
                let template = chat::template_of(&self.file).with_context(|| format!("{}: no tokenizer.chat_template", self.path.display()))?;
                let text_of = |id: Option<u32>| id.and_then(|i| self.tokenizer.token_text(i)).unwrap_or("").to_string();
                let bos = text_of(self.tokenizer.bos());
                let eos = text_of(self.tokenizer.eos());
                Ok(chat::render(template, msgs, true, &bos, &eos).with_context(|| format!("{}: rendering the chat template", self.path.display()))?)
            }
        }
    }

    /// The prompt's token ids, as the goldens make them: rendered (see [`Self::render`]), then
    /// encoded with add_special and parse_special on.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        use crate::faults::Fault;
        let text = match (self.fault, prompt) {
            (Some(Fault::ChatTemplateSkipped), Prompt::Chat(msgs)) => crate::faults::chat_without_template(msgs),
            _ => self.render(prompt)?,
        };
        let parse_special = self.fault != Some(Fault::SpecialTokensSplit);
        Ok(self.tokenizer.encode(&text, true, parse_special)?)
    }
}
