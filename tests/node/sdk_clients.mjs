// Node clients against an OpenAI-compatible base URL (argv[2]); prints one JSON object of what they got.
// Used by tests/integration/test_node_sdks.py. The Vercel AI SDK's default OpenAI provider calls /v1/responses.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { embed, generateText, streamText } from "ai";

const baseURL = process.argv[2];
const model = process.argv[3] ?? "gpt-5-mini";
const embeddingModel = process.argv[4] ?? "text-embedding-3-small";
const apiKey = process.env.HEDGE_TEST_KEY ?? "sk-unused";
const out = {};

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const r = await client.responses.create({ model, input: "Say hi" });
out.node_json = { text: r.output_text, status: r.status, usage: r.usage };
const stream = await client.responses.create({ model, input: "Say hi", stream: true });
const types = [];
let text = "";
for await (const ev of stream) {
  types.push(ev.type);
  if (ev.type === "response.output_text.delta") text += ev.delta;
}
out.node_stream = { text, types };
const e = await client.embeddings.create({ model: embeddingModel, input: ["a", "b"] });
out.node_embeddings = { count: e.data.length, dims: e.data[0].embedding.length, usage: e.usage };

const provider = createOpenAI({ baseURL, apiKey });
const g = await generateText({ model: provider(model), prompt: "Say hi" });
out.vercel_text = { text: g.text, usage: g.usage };
const st = streamText({ model: provider(model), prompt: "Say hi" });
let vt = "";
for await (const part of st.textStream) vt += part;
out.vercel_stream = { text: vt, usage: await st.usage };
const em = await embed({ model: provider.embedding(embeddingModel), value: "hello" });
out.vercel_embedding = { dims: em.embedding.length };

console.log(JSON.stringify(out));
