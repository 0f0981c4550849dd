use vellum_engine::*;
use vellum_kernels::{cpu::Cpu, BatchLayout};
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let t0 = std::time::Instant::now();
    let ck = Checkpoint::open(std::path::Path::new(&path)).unwrap();
    let model = ck.load_model().unwrap();
    eprintln!("loaded in {:?}", t0.elapsed());
    let tok = ck.tokenizer.unwrap();
    let text = tok
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    let mut ids = tok.encode(&text, true).unwrap();
    println!("{text:?} {ids:?}");
    let be = Cpu::new();
    let bs = 16;
    let mut kv = model.new_kv_cache(16, bs);
    let table: Vec<u32> = (0..16).collect();
    let mut start = 0;
    for _ in 0..20 {
        let n = ids.len();
        let positions: Vec<u32> = (start as u32..n as u32).collect();
        let batch = BatchLayout {
            slot_mapping: positions.clone(),
            positions,
            seq_offsets: vec![0, n - start],
            block_tables: vec![table.clone()],
            context_lens: vec![n],
        };
        let t1 = std::time::Instant::now();
        let lp = model
            .forward(&be, &ids[start..], &batch, &mut kv, &[n - start - 1])
            .unwrap();
        let (best, _) = lp
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
        eprintln!("{:?}", t1.elapsed());
        start = n;
        ids.push(best as u32);
    }
    println!("{:?}", tok.decode(&ids).unwrap());
}
