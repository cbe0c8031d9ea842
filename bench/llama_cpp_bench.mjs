// llama.cpp (through node-llama-cpp, installed by bench/llama_cpp/install.sh) on a GGUF written by
// tools/reference/make_gguf.py. Two modes, each printing one JSON object on stdout:
//
//   node bench/llama_cpp_bench.mjs logprobs --model F.gguf --tokens 0,17,99 [--top 5]
//       the prompt's logprobs in the shape of `splitmoe score --json` (prompt_logprobs, each
//       {token, logprob, top_logprobs: [[id, logprob], ...]}), from the raw logits of every
//       position; flash attention off and an F32 KV cache, so an F32 GGUF is compared in fp32.
//   node bench/llama_cpp_bench.mjs speed --model F.gguf [--threads 2] [--context 256]
//       [--decode-tokens 64] [--prefill 512] [--batches 1,8] [--repeats 3]
//       decode tokens/s with B sequences decoding together after a `--context`-token prompt each
//       (greedy, B * decode-tokens tokens over the wall time of the decode phase), and prefill
//       tokens/s of one `--prefill`-token prompt (up to the first sampled token). Best of
//       `--repeats`. Token ids follow engine_bench's patterns.
import {dirname, join} from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const nlc = join(here, "llama_cpp/node_modules/node-llama-cpp/dist");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(join(nlc, "index.js")).href);
const {maximumParallelismStrategy} = await import(pathToFileURL(join(nlc,
    "evaluator/LlamaContext/utils/batchItemsPrioritizationStrategies/maximumParallelismStrategy.js")).href);

function parseArgs(argv) {
    const out = {_: []};
    for (let i = 0; i < argv.length; i++) {
        if (argv[i].startsWith("--")) out[argv[i].slice(2)] = argv[++i];
        else out._.push(argv[i]);
    }
    return out;
}

const args = parseArgs(process.argv.slice(2));
const mode = args._[0];
const threads = Number(args.threads ?? 2);
if (!args.model || !["logprobs", "speed"].includes(mode)) {
    console.error("usage: llama_cpp_bench.mjs (logprobs|speed) --model F.gguf [...]");
    process.exit(2);
}

const llama = await getLlama({
    gpu: false, build: "never", maxThreads: threads, logLevel: LlamaLogLevel.error,
});
const model = await llama.loadModel({modelPath: args.model, gpuLayers: 0, useMmap: true});

function logSoftmax(logits) {
    let max = -Infinity;
    for (const v of logits) if (v > max) max = v;
    let sum = 0;
    for (const v of logits) sum += Math.exp(v - max);
    const lse = max + Math.log(sum);
    return Float64Array.from(logits, (v) => v - lse);
}

async function logprobs() {
    const tokens = args.tokens.split(",").map(Number);
    const top = Number(args.top ?? 5);
    const context = await model.createContext({
        contextSize: Math.max(64, tokens.length + 8), sequences: 1, threads,
        batchSize: Math.max(64, tokens.length), flashAttention: false,
        experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
    });
    const seq = context.getSequence();
    const input = tokens.map((t) => [t, {generateNext: {logits: true}}]);
    const res = await seq.controlledEvaluate(input);
    const prompt_logprobs = [null];
    for (let i = 0; i + 1 < tokens.length; i++) {
        const raw = res[i]?.next?.logits;
        if (!raw) throw new Error(`no logits at position ${i}`);
        // logits: Map<token, logit> (node-llama-cpp) or an array
        const dense = new Float64Array(model.tokens?.vocabularySize ?? raw.size ?? raw.length);
        if (raw instanceof Map) for (const [t, v] of raw) dense[t] = v;
        else for (let t = 0; t < raw.length; t++) dense[t] = raw[t];
        const lp = logSoftmax(dense);
        const order = Array.from(lp.keys()).sort((a, b) => lp[b] - lp[a]).slice(0, top);
        prompt_logprobs.push({
            token: tokens[i + 1], logprob: lp[tokens[i + 1]],
            top_logprobs: order.map((t) => [t, lp[t]]),
        });
    }
    await context.dispose();
    return {prompt_logprobs, prompt_tokens: tokens};
}

async function speed() {
    const ctxTokens = Number(args.context ?? 256);
    const decodeTokens = Number(args["decode-tokens"] ?? 64);
    const prefillTokens = Number(args.prefill ?? 512);
    const batches = String(args.batches ?? "1,8").split(",").map(Number);
    const repeats = Number(args.repeats ?? 3);
    const vocabSize = model.tokens?.vocabularySize ?? 32768;
    const flash = args["flash-attention"] === undefined ? undefined : args["flash-attention"] === "true";
    const result = {threads, context: ctxTokens, decode_tokens: decodeTokens, prefill: prefillTokens,
                    decode: {}, prefill_tokens_per_s: null};
    const maxB = Math.max(...batches);
    // node-llama-cpp's default batching, counting the sequences and tokens of each llama_decode,
    // so the report shows whether B sequences really decoded together
    const stats = {on: false, decodes: 0, items: 0, tokens: 0};
    const countingStrategy = (opts) => {
        const picked = maximumParallelismStrategy(opts);
        if (stats.on) {
            stats.decodes++;
            stats.items += picked.length;
            (stats.hist ??= []).push(picked.length);
            for (const p of picked) stats.tokens += Math.min(p.processAmount, p.item.tokens.length);
        }
        return picked;
    };
    const context = await model.createContext({
        batching: {itemPrioritizationStrategy: countingStrategy},
        contextSize: Math.max(prefillTokens, ctxTokens + decodeTokens + 16) * maxB,
        sequences: maxB, threads: {ideal: threads, min: threads},
        batchSize: Math.max(prefillTokens, ctxTokens * maxB),
        ...(flash === undefined ? {} : {flashAttention: flash}),
    });
    result.flash_attention = context.flashAttention;
    result.context_threads = context.currentThreads;
    const seqs = Array.from({length: maxB}, () => context.getSequence());

    for (const B of batches) {
        let best = 0;
        for (let r = 0; r < repeats; r++) {
            const active = seqs.slice(0, B);
            await Promise.all(active.map((s) => s.clearHistory()));
            // prompts as engine_bench's BM_Decode: (i * 31 + b * 17) % vocab
            await Promise.all(active.map((s, b) => s.evaluateWithoutGeneratingNewTokens(
                Array.from({length: ctxTokens}, (_, i) => (i * 31 + b * 17) % vocabSize))));
            Object.assign(stats, {on: true, decodes: 0, items: 0, tokens: 0});
            const t0 = process.hrtime.bigint();
            // lockstep, as a server steps its active slots: every step queues the B sequences'
            // next tokens in the same event-loop turn, so node-llama-cpp decodes them in one
            // llama_decode (checked: decode_sequences_per_step), then samples greedily
            let next = active.map(() => 42);
            for (let step = 0; step < decodeTokens; step++) {
                const res = await Promise.all(active.map((s, b) => s.controlledEvaluate(
                    [[next[b], {generateNext: {token: true, options: {temperature: 0}}}]])));
                next = res.map((r) => r[0]?.next?.token ?? 42);
            }
            const secs = Number(process.hrtime.bigint() - t0) / 1e9;
            stats.on = false;
            best = Math.max(best, (B * decodeTokens) / secs);
            result.decode_sequences_per_step ??= {};
            result.decode_sequences_per_step[B] = stats.items / Math.max(1, stats.decodes);
            if (process.env.LLAMA_BENCH_DEBUG) console.error(`B=${B} sequences per decode:`, JSON.stringify(stats.hist));
            stats.hist = [];
        }
        result.decode[B] = best;
    }
    {
        let best = 0;
        const prompt = Array.from({length: prefillTokens}, (_, i) => (i * 7919 + 11) % vocabSize);
        for (let r = 0; r < repeats; r++) {
            await seqs[0].clearHistory();
            const t0 = process.hrtime.bigint();
            for await (const _ of seqs[0].evaluate(prompt, {temperature: 0})) break;
            const secs = Number(process.hrtime.bigint() - t0) / 1e9;
            best = Math.max(best, prefillTokens / secs);
        }
        result.prefill_tokens_per_s = best;
    }
    await context.dispose();
    return result;
}

const out = mode === "logprobs" ? await logprobs() : await speed();
out.llama_cpp = {
    node_llama_cpp: (await import(pathToFileURL(join(
        here, "llama_cpp/node_modules/node-llama-cpp/package.json")).href, {with: {type: "json"}})).default.version,
    llama_cpp_release: llama.llamaCppRelease?.release,
    build: llama.buildType, gpu: llama.gpu, system_info: llama.systemInfo,
};
console.log(JSON.stringify(out));
await model.dispose();
await llama.dispose();
