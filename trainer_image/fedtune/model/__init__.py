"""Models: base models from local folders (`base`), ChatGLM's formats as native GLM (`chatglm`, `folders`),
adapters and the weights that travel (`adapters`, `adalora`, `names`), precision and quantisation
(`precision`), the training loss (`loss`) and the tiny model the tests and the demo build (`tiny`).

May import: `fedtune.spec` and the foundations (`files`, `logs`). Nothing here knows about parties,
rounds or the network."""
