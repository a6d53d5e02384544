"""What every benchmark figure shares: a grid of panels, their axes and legends, the title, and
the PNG written whole (files.write_atomically)."""
from ssl_ema.base import files


def panels(count: int, width: float, height: float):
    """(figure, axes) of `count` panels, at most three a line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    columns = max(1, min(3, count))
    return plt.subplots(-(-max(1, count) // columns), columns,
                        figsize=(width * columns, height * -(-max(1, count) // columns)),
                        squeeze=False)


def label(ax, xlabel: str, ylabel: str, drawn: dict) -> None:
    """Axis labels, grid and legend of one panel; its curves' labels into drawn[its title]."""
    drawn[ax.get_title()] = [line.get_label() for line in ax.get_lines()]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save(figure, axes, used: int, title: str, path: str) -> None:
    """Blank the unused panels, title the figure, write it to `path` as PNG and close it."""
    import matplotlib.pyplot as plt
    for ax in list(axes.flat)[used:]:
        ax.axis('off')
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.97))   # leave the top strip to the title
    files.write_atomically(path, lambda f: figure.savefig(f, format='png', dpi=100))
    plt.close(figure)
