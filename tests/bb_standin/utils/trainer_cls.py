"""Stand-in: the metric aggregator (epoch CSV + last/valid_max/exist_nan_value summary), test loops and plots."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch


class Metric_Aggregator(object):
    def __init__(self):
        self.history = []

    def __call__(self, one_metric):
        self.history.append({k: v for k, v in one_metric.items() if v is not None})

    def to_dataframe(self):
        self.df = pd.DataFrame(self.history, dtype=object)
        return self.df

    def summary(self):
        df = self.to_dataframe()
        return df.apply(lambda col: pd.Series(
            [col.dropna().iloc[-1], pd.to_numeric(col, errors="coerce").max(), any(v == "nan_value" for v in col)],
            index=["last", "valid_max", "exist_nan_value"]))


def all_acc(preds, labels):
    return preds.eq(labels).sum().item() / len(preds) if len(preds) else None


@torch.no_grad()
def _run(model, loader, criterion, device, non_blocking):
    model.to(device, non_blocking=non_blocking)
    model.eval()
    loss_sum, outputs = 0.0, []
    for x, labels, *rest in loader:
        pred = model(x.to(device, non_blocking=non_blocking))
        labels = labels.to(device, non_blocking=non_blocking)
        loss_sum += criterion(pred, labels.long()).item()
        outputs.append((pred.argmax(-1).cpu(), labels.cpu(), *[torch.as_tensor(r) for r in rest]))
    columns = [torch.cat(c) for c in zip(*outputs)]
    metrics = {"test_loss_avg_over_batch": loss_sum / len(loader),
               "test_acc": all_acc(columns[0], columns[1]), "test_total": len(columns[1])}
    return metrics, columns


def given_dataloader_test(model, test_dataloader, criterion, non_blocking=False, device="cpu", verbose=0):
    metrics, columns = _run(model, test_dataloader, criterion, device, non_blocking)
    return (metrics, None, None) if verbose == 0 else (metrics, columns[0], columns[1])


def test_given_dataloader_on_mix(model, test_dataloader, criterion, device=None, non_blocking=True, verbose=0):
    metrics, columns = _run(model, test_dataloader, criterion, device, non_blocking)
    return (metrics, None, None, None, None, None) if verbose == 0 else (metrics, *columns)


def _plot(series, save_file, ylabel, ylim=None):
    plt.figure(figsize=(12.8, 9.6))
    for label, values in series.items():
        plt.plot(range(len(values)), values, marker="o", label=label)
    plt.xlabel("Epochs")
    plt.ylabel(ylabel)
    if ylim:
        plt.ylim(ylim)
    plt.legend()
    plt.grid()
    plt.savefig(save_file)
    plt.close()


def plot_loss(train_loss_list, clean_test_loss_list, bd_test_loss_list, save_folder_path,
              save_file_name="loss_metric_plots"):
    _plot({"Train Loss": train_loss_list, "Test Clean loss": clean_test_loss_list,
           "Test Backdoor Loss": bd_test_loss_list}, f"{save_folder_path}/{save_file_name}.png", "Loss")


def plot_acc_like_metric_pure(train_acc_list, test_acc_list, test_asr_list, test_ra_list, save_folder_path,
                              save_file_name="acc_like_metric_plots"):
    _plot({"Train Acc": train_acc_list, "Test C-Acc": test_acc_list, "Test ASR": test_asr_list,
           "Test RA": test_ra_list}, f"{save_folder_path}/{save_file_name}.png", "ACC", (0, 1))
