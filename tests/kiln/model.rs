use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln::model::{KvCache, LanguageModel, LlamaForCausalLM, LlamaShape, RotaryTables};
use kiln::params;

fn shape(num_kv_heads: usize, tied: bool) -> LlamaShape {
    LlamaShape {
        vocab_size: 50,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads,
        intermediate_size: 48,
        max_position_embeddings: 64,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tied,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
    }
}

fn tokens(ids: &[i32], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn logits_vec(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

#[test]
fn logits_have_batch_seq_vocab_shape_and_names_mirror_hugging_face() {
    let device = Device::flex();
    for (kv, tied) in [(4, false), (2, true), (1, false)] {
        let s = shape(kv, tied);
        let model = LlamaForCausalLM::init(&s, 0.02, 0.0, 1, &device);
        let input = Tensor::<2, Int>::zeros([3, 10], &device);
        assert_eq!(model.forward(input).dims(), [3, 10, 50]);

        let named = params::named_shapes(&model);
        let count: usize = named.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(count, s.num_params());
        let lookup = |n: &str| named.iter().find(|(name, _)| name == n).map(|(_, s)| s.clone());
        assert_eq!(lookup("model.embed_tokens.weight"), Some(vec![50, 32]));
        assert_eq!(lookup("model.layers.1.self_attn.q_proj.weight"), Some(vec![32, 32]));
        assert_eq!(lookup("model.layers.0.self_attn.k_proj.weight"), Some(vec![kv * 8, 32]));
        assert_eq!(lookup("model.layers.0.mlp.down_proj.weight"), Some(vec![32, 48]));
        assert_eq!(lookup("model.layers.0.mlp.gate_proj.weight"), Some(vec![48, 32]));
        assert_eq!(lookup("model.layers.1.post_attention_layernorm.weight"), Some(vec![32]));
        assert_eq!(lookup("model.norm.weight"), Some(vec![32]));
        assert_eq!(lookup("lm_head.weight"), (!tied).then(|| vec![50, 32]));
        let per_layer = 9;
        assert_eq!(named.len(), 2 * per_layer + 2 + usize::from(!tied));
    }
}

#[test]
fn changing_a_future_token_leaves_earlier_logits_unchanged() {
    let device = Device::flex();
    let model = LlamaForCausalLM::init(&shape(2, false), 0.5, 0.0, 3, &device);
    let a: Vec<i32> = (0..16).map(|i| (i * 7 % 50) as i32).collect();
    let mut b = a.clone();
    let changed = 9;
    b[changed] = (b[changed] + 13) % 50;
    let la = logits_vec(model.forward(tokens(&a, &device)));
    let lb = logits_vec(model.forward(tokens(&b, &device)));
    let vocab = 50;
    for pos in 0..16 {
        let diff = (0..vocab)
            .map(|v| (la[pos * vocab + v] - lb[pos * vocab + v]).abs())
            .fold(0.0f32, f32::max);
        if pos < changed {
            assert!(diff == 0.0, "position {pos} saw the future: max diff {diff}");
        } else {
            assert!(diff > 1e-4, "position {pos} ignored a change at or before it");
        }
    }
}

#[test]
fn incremental_decoding_with_the_kv_cache_matches_a_full_forward() {
    let device = Device::flex();
    let model = LlamaForCausalLM::init(&shape(2, true), 0.3, 0.0, 5, &device);
    let ids: Vec<i32> = (0..12).map(|i| (i * 11 % 50) as i32).collect();
    let full = logits_vec(model.forward(tokens(&ids, &device)));

    let mut cache = KvCache::new(2);
    let mut pieces = logits_vec(model.forward_cached(tokens(&ids[..5], &device), Some(&mut cache)));
    assert_eq!(cache.len(), 5);
    // A multi-token block after cached positions, then single tokens.
    pieces.extend(logits_vec(model.forward_cached(tokens(&ids[5..8], &device), Some(&mut cache))));
    for id in &ids[8..] {
        pieces.extend(logits_vec(model.forward_cached(tokens(&[*id], &device), Some(&mut cache))));
    }
    assert_eq!(cache.len(), 12);
    let max_diff = full
        .iter()
        .zip(&pieces)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "cached decoding differs by {max_diff}");
}

#[test]
fn last_logits_are_the_last_position_of_a_full_forward_for_each_sequence() {
    let device = Device::flex();
    for tied in [false, true] {
        let model = LlamaForCausalLM::init(&shape(2, tied), 0.3, 0.0, 5, &device);
        let ids: Vec<i32> = (0..2 * 7).map(|i| i * 13 % 50).collect();
        let batch = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [2, 7]), &device);
        let full = logits_vec(model.forward(batch.clone()));
        let mut cache = KvCache::new(2);
        let last = logits_vec(model.last_logits(batch, Some(&mut cache)).unsqueeze_dim(1));
        assert_eq!(cache.len(), 7, "last_logits fills the cache as forward_cached does");
        assert_eq!(last.len(), 2 * 50);
        for (seq, want) in [&full[6 * 50..7 * 50], &full[13 * 50..14 * 50]].into_iter().enumerate() {
            let got = &last[seq * 50..(seq + 1) * 50];
            let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "sequence {seq} (tied: {tied}): last logits differ by {diff}");
        }
    }
}

#[test]
fn initialisation_is_seeded_and_backend_independent() {
    let s = shape(2, false);
    let a = params::named_tensors(&LlamaForCausalLM::init(&s, 0.02, 0.0, 9, &Device::flex()));
    #[allow(deprecated)]
    let b = params::named_tensors(&LlamaForCausalLM::init(&s, 0.02, 0.0, 9, &Device::ndarray()));
    let c = params::named_tensors(&LlamaForCausalLM::init(&s, 0.02, 0.0, 10, &Device::flex()));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let embed = &a[0];
    let mean: f32 = embed.values.iter().sum::<f32>() / embed.values.len() as f32;
    let var: f32 = embed.values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / embed.values.len() as f32;
    assert!((var.sqrt() - 0.02).abs() < 0.002, "std {}", var.sqrt());
}

#[test]
fn a_model_for_loading_has_the_same_parameters_and_computes_exactly_what_it_loads() {
    let device = Device::flex();
    for tied in [false, true] {
        let s = shape(2, tied);
        let original = LlamaForCausalLM::init(&s, 0.3, 0.0, 4, &device);
        let weights = params::named_tensors(&original);
        let skeleton = LlamaForCausalLM::for_loading(&s, 0.0, &device);
        assert_eq!(params::named_shapes(&skeleton), params::named_shapes(&original));
        // Its matrices are zero (nothing drawn), so only loading gives it values.
        let embed = &params::named_tensors(&skeleton)[0];
        assert!(embed.values.iter().all(|&v| v == 0.0), "{}", embed.name);

        let mut source = |name: &str, _: &[usize]| {
            weights.iter().find(|t| t.name == name).map(|t| t.values.clone()).ok_or(format!("missing {name}"))
        };
        let loaded = params::load_named(skeleton, &mut source).unwrap();
        assert_eq!(params::named_tensors(&loaded), weights);
        let input = tokens(&[3, 1, 4, 1, 5, 9, 2, 6], &device);
        let (a, b) = (logits_vec(original.forward(input.clone())), logits_vec(loaded.forward(input)));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "tied {tied}: logits differ");
    }
}

#[test]
fn a_single_token_attends_only_to_itself() {
    // With one position, attention returns v exactly, so the layer output is independent of
    // q and k (and of RoPE); two different sequences sharing the first token agree there.
    let device = Device::flex();
    let model = LlamaForCausalLM::init(&shape(1, false), 0.2, 0.0, 2, &device);
    let one = logits_vec(model.forward(tokens(&[3], &device)));
    let more = logits_vec(model.forward(tokens(&[3, 4, 5], &device)));
    for v in 0..50 {
        assert!((one[v] - more[v]).abs() < 1e-6);
    }
}

/// Rotary embedding against a direct evaluation of Hugging Face's rotate-half formula:
/// dimension `i` pairs with `i + d/2`, both rotated by `pos * theta^(-2i/d)`.
#[test]
fn rotary_embedding_uses_the_rotate_half_convention() {
    let device = Device::flex();
    let (d, theta) = (8usize, 500.0f64);
    let rope = RotaryTables::new(d, 32, theta);
    let x: Vec<f32> = (0..3 * d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
    let input = Tensor::<4>::from_data(TensorData::new(x.clone(), [1, 1, 3, d]), &device);
    let start = 20;
    let out: Vec<f32> = rope.apply(input, start).into_data().convert::<f32>().try_into_vec().unwrap();
    for row in 0..3 {
        let pos = (start + row) as f64;
        let v = &x[row * d..(row + 1) * d];
        for i in 0..d / 2 {
            let angle = pos * theta.powf(-2.0 * i as f64 / d as f64);
            let (c, s) = (angle.cos(), angle.sin());
            let (a, b) = (v[i] as f64, v[i + d / 2] as f64);
            let lo = a * c - b * s;
            let hi = b * c + a * s;
            assert!((out[row * d + i] as f64 - lo).abs() < 1e-5, "row {row} dim {i}");
            assert!((out[row * d + i + d / 2] as f64 - hi).abs() < 1e-5, "row {row} dim {}", i + d / 2);
        }
    }
}
