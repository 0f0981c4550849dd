//! A serving frontend embedding Vellum: many client threads submit prompts to one engine
//! through an `EngineHandle` and print their streamed completions.
//!
//!     cargo run --release --example frontend -- [MODEL] [CLIENTS]
//!
//! MODEL defaults to the fetched SmolLM2 (`scripts/fetch-model.sh`).

use vellum::engine::{ChatMessage, Engine, EngineHandle, Request, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let clients: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(6);
    let engine = Engine::builder().model(&model).build()?;
    let tokenizer = engine
        .tokenizer()
        .ok_or("the model has no tokenizer")?
        .clone();
    let handle = EngineHandle::spawn(engine);
    let questions = [
        "What is the capital of France?",
        "Name a primary color.",
        "How many days are in a week?",
        "What do bees make?",
        "What is 2 + 2?",
        "Which planet do we live on?",
    ];
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let (handle, tokenizer) = (&handle, &tokenizer);
            let question = questions[c % questions.len()];
            s.spawn(move || -> Result<(), String> {
                let chat = [ChatMessage {
                    role: "user".into(),
                    content: question.into(),
                }];
                let text = tokenizer
                    .apply_chat_template(&chat, true)
                    .map_err(|e| e.to_string())?;
                let prompt = tokenizer.encode(&text, false).map_err(|e| e.to_string())?;
                let params = SamplingParams::default()
                    .max_tokens(40)
                    .temperature(0.3)
                    .seed(c as u64);
                let mut answer = String::new();
                for out in handle.submit(Request::tokens(prompt, params))? {
                    answer.push_str(&out?.text_delta);
                }
                println!("[client {c}] {question}\n    {}", answer.trim());
                Ok(())
            });
        }
    });
    eprintln!(
        "{clients} clients served in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
